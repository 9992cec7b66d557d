-- A counter bumped by every change to who may sign in or to which teams with which role (token
-- revoked, agent added to or removed from a team, role changed), whichever process made it: the
-- relay polls it and checks its open connections again when it moves.
CREATE TABLE access_version (id INTEGER PRIMARY KEY CHECK (id = 1), version INTEGER NOT NULL);
INSERT INTO access_version (id, version) VALUES (1, 0);
CREATE TRIGGER tokens_updated AFTER UPDATE ON tokens BEGIN UPDATE access_version SET version = version + 1; END;
CREATE TRIGGER tokens_deleted AFTER DELETE ON tokens BEGIN UPDATE access_version SET version = version + 1; END;
CREATE TRIGGER memberships_added AFTER INSERT ON memberships BEGIN UPDATE access_version SET version = version + 1; END;
CREATE TRIGGER memberships_updated AFTER UPDATE ON memberships BEGIN UPDATE access_version SET version = version + 1; END;
CREATE TRIGGER memberships_deleted AFTER DELETE ON memberships BEGIN UPDATE access_version SET version = version + 1; END;
