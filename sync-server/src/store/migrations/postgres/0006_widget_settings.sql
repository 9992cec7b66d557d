-- The web widget of each team: a public key that names the team in the snippet (rotatable, so
-- an old snippet can be retired), the greeting, and the origins (websites) it may run on.
CREATE TABLE widget_settings (
    team       TEXT PRIMARY KEY REFERENCES teams (id),
    key        TEXT NOT NULL UNIQUE,
    greeting   TEXT,
    rotated_at BIGINT NOT NULL
);
CREATE TABLE widget_origins (
    team   TEXT NOT NULL REFERENCES teams (id),
    origin TEXT NOT NULL,                -- normalized: scheme://host[:port], no default port
    PRIMARY KEY (team, origin)
);
