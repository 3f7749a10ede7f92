-- The catalog, progress and settings. View tables are derived from the view
-- registry at start (see src/store/sqlite.rs), not written here by hand.

CREATE TABLE advertisers (
    advertiser_id INTEGER PRIMARY KEY,   -- u64 ids are stored bit-cast to i64
    name TEXT NOT NULL,
    api_key_hash BLOB NOT NULL UNIQUE,   -- SHA-256 of the key; the key itself is never stored
    created_at_ms INTEGER NOT NULL
);

CREATE TABLE campaigns (
    campaign_id INTEGER PRIMARY KEY,
    advertiser_id INTEGER NOT NULL REFERENCES advertisers (advertiser_id)
);

CREATE TABLE ads (
    ad_id INTEGER PRIMARY KEY,
    advertiser_id INTEGER NOT NULL REFERENCES advertisers (advertiser_id),
    campaign_id INTEGER NOT NULL REFERENCES campaigns (campaign_id),
    landing_url TEXT NOT NULL,
    cpc_micros INTEGER NOT NULL,
    updated_at_ms INTEGER NOT NULL
);
CREATE INDEX ads_by_advertiser ON ads (advertiser_id);

-- One row per sink commit: the frontier and the log positions committed with it.
-- Older rows are pruned once they are beyond what recovery could need.
CREATE TABLE progress (
    upper INTEGER PRIMARY KEY,
    positions TEXT NOT NULL,
    committed_at_ms INTEGER NOT NULL
);

CREATE TABLE settings (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
