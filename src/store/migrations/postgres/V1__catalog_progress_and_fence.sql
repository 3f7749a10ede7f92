-- The catalog, progress, settings and the writer fence. View tables are derived from
-- the view registry at start (see src/store/postgres.rs), not written here by hand.
-- Keep this in step with ../sqlite/V1__catalog_and_progress.sql: the two stores share
-- one behaviour (src/store/conformance.rs).

CREATE TABLE advertisers (
    advertiser_id BIGINT PRIMARY KEY,    -- u64 ids are stored bit-cast to i64
    name TEXT NOT NULL,
    api_key_hash BYTEA NOT NULL UNIQUE,  -- SHA-256 of the key; the key itself is never stored
    created_at_ms BIGINT NOT NULL
);

CREATE TABLE campaigns (
    campaign_id BIGINT PRIMARY KEY,
    advertiser_id BIGINT NOT NULL REFERENCES advertisers (advertiser_id)
);

CREATE TABLE ads (
    ad_id BIGINT PRIMARY KEY,
    advertiser_id BIGINT NOT NULL REFERENCES advertisers (advertiser_id),
    campaign_id BIGINT NOT NULL REFERENCES campaigns (campaign_id),
    landing_url TEXT NOT NULL,
    cpc_micros BIGINT NOT NULL,
    updated_at_ms BIGINT NOT NULL
);
CREATE INDEX ads_by_advertiser ON ads (advertiser_id);

-- One row per sink commit: the frontier and the log positions committed with it.
-- Older rows are pruned once they are beyond what recovery could need.
CREATE TABLE progress (
    upper BIGINT PRIMARY KEY,
    positions TEXT NOT NULL,
    committed_at_ms BIGINT NOT NULL
);

CREATE TABLE settings (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);

-- The one sink writer. A claim takes a session advisory lock and increments the
-- generation; every commit locks this row and checks the generation is still its own,
-- so a writer that lost its lock and was replaced can never commit again.
CREATE TABLE writer_fence (
    only_row BOOLEAN PRIMARY KEY DEFAULT TRUE CHECK (only_row),
    generation BIGINT NOT NULL,
    holder TEXT NOT NULL,
    claimed_at_ms BIGINT NOT NULL
);
INSERT INTO writer_fence (generation, holder, claimed_at_ms) VALUES (0, 'nobody yet', 0);
