-- Which change holds each (actor, sequence number) of a document. A modified client could send two
-- different changes with the same actor and sequence number, one to each of two relay instances;
-- both would be stored and no instance could load the conversation again. The group commit records
-- every client change here and refuses a chunk whose change takes a place another change holds.
-- (Changes stored before this table existed are not listed: the check covers what comes after.)
CREATE TABLE change_seqs (
    doc_id TEXT   NOT NULL,
    actor  TEXT   NOT NULL,
    seq    BIGINT NOT NULL,
    hash   TEXT   NOT NULL,
    PRIMARY KEY (doc_id, actor, seq)
);
