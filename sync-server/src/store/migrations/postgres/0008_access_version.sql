-- A counter bumped by every change to who may sign in or to which teams with which role (token
-- revoked, agent added to or removed from a team, role changed), whichever instance or admin
-- command made it: every relay instance polls it and checks its open connections again when it moves.
CREATE TABLE access_version (id INTEGER PRIMARY KEY CHECK (id = 1), version BIGINT NOT NULL);
INSERT INTO access_version (id, version) VALUES (1, 0);
CREATE FUNCTION bump_access_version() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE access_version SET version = version + 1;
    RETURN NULL;
END
$$;
CREATE TRIGGER tokens_access AFTER UPDATE OR DELETE ON tokens
    FOR EACH STATEMENT EXECUTE FUNCTION bump_access_version();
CREATE TRIGGER memberships_access AFTER INSERT OR UPDATE OR DELETE ON memberships
    FOR EACH STATEMENT EXECUTE FUNCTION bump_access_version();
