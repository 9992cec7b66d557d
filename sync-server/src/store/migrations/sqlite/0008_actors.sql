-- Which agent first used each automerge actor id (hex): a change made with an actor bound to
-- another agent is refused, so nobody can write with a teammate's actor and sequence numbers.
CREATE TABLE actors (
    actor TEXT PRIMARY KEY,
    agent TEXT NOT NULL,
    first_seen INTEGER NOT NULL
) WITHOUT ROWID;
