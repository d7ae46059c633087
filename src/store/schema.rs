//! Every table of the shared state, in both dialects side by side: what one node keeps
//! in its SQLite files and what a cluster keeps in PostgreSQL are the same tables under
//! the same names, so an operator reads them the same way and the two cannot drift
//! apart unnoticed (the tests below apply both).
//!
//! A schema is a list of migrations, applied in order and recorded per schema in
//! `schema_versions` (SQLite) or `smartrelay_schema_versions` (PostgreSQL). Files and
//! databases made before that table existed are recognized by their first table.

/// One step of a schema, in both dialects.
#[derive(Debug, Clone, Copy)]
pub struct Migration {
    pub sqlite: &'static str,
    pub postgres: &'static str,
}

/// The tables one owner (a room) keeps.
#[derive(Debug, Clone, Copy)]
pub struct Schema {
    /// The row in the versions table.
    pub name: &'static str,
    /// A table the first migration creates: found without a version row, the schema
    /// is at version 1 (made by a relay before versions were kept per schema).
    pub probe: &'static str,
    pub migrations: &'static [Migration],
}

/// The trusted-sender list (`trusted.database`). PostgreSQL shares one database with
/// the relay state, whose `meta` table is another; so the list's own is `trusted_meta`.
pub const TRUSTED: Schema = Schema {
    name: "trusted",
    probe: "recipients",
    migrations: &[Migration {
        sqlite: "CREATE TABLE recipients(
            address TEXT PRIMARY KEY,
            domain TEXT NOT NULL,
            count INTEGER NOT NULL,
            first_seen INTEGER NOT NULL,
            last_seen INTEGER NOT NULL,
            origin TEXT NOT NULL DEFAULT 'learned') WITHOUT ROWID;
         CREATE INDEX recipients_domain ON recipients(domain);
         CREATE INDEX recipients_last_seen ON recipients(last_seen);
         CREATE TABLE pairs(
            sender TEXT NOT NULL,
            recipient TEXT NOT NULL,
            count INTEGER NOT NULL,
            first_seen INTEGER NOT NULL,
            last_seen INTEGER NOT NULL,
            PRIMARY KEY(sender, recipient)) WITHOUT ROWID;
         CREATE INDEX pairs_recipient ON pairs(recipient);
         CREATE INDEX pairs_last_seen ON pairs(last_seen);
         CREATE TABLE daily(day INTEGER PRIMARY KEY, added INTEGER NOT NULL, deliveries INTEGER NOT NULL);
         CREATE TABLE meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);",
        postgres: "CREATE TABLE recipients(
            address TEXT PRIMARY KEY,
            domain TEXT NOT NULL,
            count BIGINT NOT NULL,
            first_seen BIGINT NOT NULL,
            last_seen BIGINT NOT NULL,
            origin TEXT NOT NULL DEFAULT 'learned');
         CREATE INDEX recipients_domain ON recipients(domain);
         CREATE INDEX recipients_last_seen ON recipients(last_seen);
         CREATE TABLE pairs(
            sender TEXT NOT NULL,
            recipient TEXT NOT NULL,
            count BIGINT NOT NULL,
            first_seen BIGINT NOT NULL,
            last_seen BIGINT NOT NULL,
            PRIMARY KEY(sender, recipient));
         CREATE INDEX pairs_recipient ON pairs(recipient);
         CREATE INDEX pairs_last_seen ON pairs(last_seen);
         CREATE TABLE daily(day BIGINT PRIMARY KEY, added BIGINT NOT NULL, deliveries BIGINT NOT NULL);
         CREATE TABLE trusted_meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);",
    }, Migration {
        // A restricted key value's recent recipients: `origin` 'suspect', and which
        // restriction marked them (`sender=alice@contoso.test`), for release or discard.
        sqlite: "ALTER TABLE recipients ADD COLUMN suspect TEXT;
         CREATE INDEX recipients_suspect ON recipients(suspect);",
        postgres: "ALTER TABLE recipients ADD COLUMN suspect TEXT;
         CREATE INDEX recipients_suspect ON recipients(suspect);",
    }],
};

/// The relay's own state (`admin.database`): observed sources, hourly flow counters,
/// and small JSON values (confirmations, persisted shared ranges).
pub const STATE: Schema = Schema {
    name: "state",
    probe: "sources",
    migrations: &[Migration {
        sqlite: "CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
         CREATE TABLE IF NOT EXISTS sources(
            ip TEXT PRIMARY KEY,
            connections INTEGER NOT NULL DEFAULT 0,
            refused INTEGER NOT NULL DEFAULT 0,
            messages INTEGER NOT NULL DEFAULT 0,
            first_seen INTEGER NOT NULL,
            last_seen INTEGER NOT NULL);
         CREATE TABLE IF NOT EXISTS flow(
            hour INTEGER NOT NULL, metric TEXT NOT NULL, key TEXT NOT NULL,
            count INTEGER NOT NULL, PRIMARY KEY(hour, metric, key)) WITHOUT ROWID;",
        postgres: "CREATE TABLE meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
         CREATE TABLE sources(
            ip TEXT PRIMARY KEY,
            connections BIGINT NOT NULL DEFAULT 0,
            refused BIGINT NOT NULL DEFAULT 0,
            messages BIGINT NOT NULL DEFAULT 0,
            first_seen BIGINT NOT NULL,
            last_seen BIGINT NOT NULL);
         CREATE TABLE flow(
            hour BIGINT NOT NULL, metric TEXT NOT NULL, key TEXT NOT NULL,
            count BIGINT NOT NULL, PRIMARY KEY(hour, metric, key));",
    }],
};

/// The DKIM signatures that proved a message from a shared range, with the recipients
/// each was accepted for (`tenant::replay`). In `admin.database` on one node.
pub const SIGNATURES: Schema = Schema {
    name: "signatures",
    probe: "dkim_signatures",
    migrations: &[Migration {
        sqlite: "CREATE TABLE dkim_signatures(
            hash BLOB PRIMARY KEY,
            domain TEXT NOT NULL,
            first_seen INTEGER NOT NULL,
            node TEXT NOT NULL) WITHOUT ROWID;
         CREATE INDEX dkim_signatures_first_seen ON dkim_signatures(first_seen);
         CREATE TABLE dkim_recipients(
            hash BLOB NOT NULL,
            recipient TEXT NOT NULL,
            PRIMARY KEY(hash, recipient)) WITHOUT ROWID;",
        postgres: "CREATE TABLE dkim_signatures(
            hash BYTEA PRIMARY KEY,
            domain TEXT NOT NULL,
            first_seen BIGINT NOT NULL,
            node TEXT NOT NULL);
         CREATE INDEX dkim_signatures_first_seen ON dkim_signatures(first_seen);
         CREATE TABLE dkim_recipients(
            hash BYTEA NOT NULL,
            recipient TEXT NOT NULL,
            PRIMARY KEY(hash, recipient));",
    }],
};

/// The limits' counters (one GCRA cell per rule, measure and key value, `tat` in
/// microseconds of the Unix clock) and the restricted key values with what became of
/// them (`state`: restricted, released, discarded), each row stamped when it last
/// changed so nodes take only what changed. In `admin.database` on one node.
pub const LIMITS: Schema = Schema {
    name: "limits",
    probe: "limit_counters",
    migrations: &[Migration {
        sqlite: "CREATE TABLE limit_counters(
            rule TEXT NOT NULL,
            measure TEXT NOT NULL,
            value TEXT NOT NULL,
            tat INTEGER NOT NULL,
            updated INTEGER NOT NULL,
            PRIMARY KEY(rule, measure, value)) WITHOUT ROWID;
         CREATE INDEX limit_counters_updated ON limit_counters(updated);
         CREATE TABLE restricted(
            key TEXT NOT NULL,
            value TEXT NOT NULL,
            rule TEXT NOT NULL,
            since INTEGER NOT NULL,
            count INTEGER NOT NULL,
            state TEXT NOT NULL,
            updated INTEGER NOT NULL,
            PRIMARY KEY(key, value)) WITHOUT ROWID;
         CREATE INDEX restricted_updated ON restricted(updated);",
        postgres: "CREATE TABLE limit_counters(
            rule TEXT NOT NULL,
            measure TEXT NOT NULL,
            value TEXT NOT NULL,
            tat BIGINT NOT NULL,
            updated BIGINT NOT NULL,
            PRIMARY KEY(rule, measure, value));
         CREATE INDEX limit_counters_updated ON limit_counters(updated);
         CREATE TABLE restricted(
            key TEXT NOT NULL,
            value TEXT NOT NULL,
            rule TEXT NOT NULL,
            since BIGINT NOT NULL,
            count BIGINT NOT NULL,
            state TEXT NOT NULL,
            updated BIGINT NOT NULL,
            PRIMARY KEY(key, value));
         CREATE INDEX restricted_updated ON restricted(updated);",
    }],
};

/// Message tracking (`tracking.database`): one row per message, one per recipient,
/// and the timeline in arrays of lines. Searches by Message-ID, sender and recipient use their indexes;
/// `sender` and `address` are kept lower-case for them.
pub const TRACKING: Schema = Schema {
    name: "tracking",
    probe: "tracked_messages",
    migrations: &[
        Migration {
            sqlite: "CREATE TABLE tracked_messages(
            queue_id TEXT PRIMARY KEY,
            node TEXT NOT NULL,
            received_at INTEGER NOT NULL,
            client TEXT NOT NULL,
            helo TEXT NOT NULL,
            tls TEXT,
            proof TEXT NOT NULL,
            sender TEXT NOT NULL,
            message_id TEXT,
            size INTEGER NOT NULL,
            subject TEXT,
            status TEXT NOT NULL) WITHOUT ROWID;
         CREATE INDEX tracked_messages_received ON tracked_messages(received_at, queue_id);
         CREATE INDEX tracked_messages_message_id ON tracked_messages(message_id);
         CREATE INDEX tracked_messages_sender ON tracked_messages(sender, received_at);
         CREATE TABLE tracked_recipients(
            queue_id TEXT NOT NULL,
            address TEXT NOT NULL,
            status TEXT NOT NULL,
            PRIMARY KEY(queue_id, address)) WITHOUT ROWID;
         CREATE INDEX tracked_recipients_address ON tracked_recipients(address, queue_id);
         CREATE TABLE tracked_events(
            id INTEGER PRIMARY KEY,
            queue_id TEXT NOT NULL,
            at INTEGER NOT NULL,
            type TEXT NOT NULL,
            recipient TEXT,
            detail TEXT NOT NULL);
         CREATE INDEX tracked_events_queue_id ON tracked_events(queue_id, id);",
            postgres: "CREATE TABLE tracked_messages(
            queue_id TEXT PRIMARY KEY,
            node TEXT NOT NULL,
            received_at BIGINT NOT NULL,
            client TEXT NOT NULL,
            helo TEXT NOT NULL,
            tls TEXT,
            proof TEXT NOT NULL,
            sender TEXT NOT NULL,
            message_id TEXT,
            size BIGINT NOT NULL,
            subject TEXT,
            status TEXT NOT NULL);
         CREATE INDEX tracked_messages_received ON tracked_messages(received_at, queue_id);
         CREATE INDEX tracked_messages_message_id ON tracked_messages(message_id);
         CREATE INDEX tracked_messages_sender ON tracked_messages(sender, received_at);
         CREATE TABLE tracked_recipients(
            queue_id TEXT NOT NULL,
            address TEXT NOT NULL,
            status TEXT NOT NULL,
            PRIMARY KEY(queue_id, address));
         CREATE INDEX tracked_recipients_address ON tracked_recipients(address, queue_id);
         CREATE TABLE tracked_events(
            id BIGSERIAL PRIMARY KEY,
            queue_id TEXT NOT NULL,
            at BIGINT NOT NULL,
            type TEXT NOT NULL,
            recipient TEXT,
            detail TEXT NOT NULL);
         CREATE INDEX tracked_events_queue_id ON tracked_events(queue_id, id);",
        },
        // A message's timeline as arrays of lines, one row per message and batch (most
        // messages: one row) instead of one row per line: the recorder's inserts were
        // most of what tracking cost the relay. (Not in the message's row: its table is
        // what searches without an index scan, and it must stay narrow.) Lines already
        // kept become one-line arrays.
        Migration {
            sqlite: "CREATE TABLE tracked_lines(
            id INTEGER PRIMARY KEY,
            queue_id TEXT NOT NULL,
            at INTEGER NOT NULL,
            lines TEXT NOT NULL);
         CREATE INDEX tracked_lines_queue_id ON tracked_lines(queue_id, id);
         INSERT INTO tracked_lines(id, queue_id, at, lines)
            SELECT id, queue_id, at,
                   json_array(json_patch(detail,
                       json_object('at', at, 'type', type, 'recipient', recipient)))
            FROM tracked_events;
         DROP TABLE tracked_events;",
            postgres: "CREATE TABLE tracked_lines(
            id BIGSERIAL PRIMARY KEY,
            queue_id TEXT NOT NULL,
            at BIGINT NOT NULL,
            lines TEXT NOT NULL);
         CREATE INDEX tracked_lines_queue_id ON tracked_lines(queue_id, id);
         INSERT INTO tracked_lines(id, queue_id, at, lines)
            SELECT id, queue_id, at,
                   jsonb_build_array(detail::jsonb
                       || jsonb_build_object('at', at, 'type', type)
                       || CASE WHEN recipient IS NULL THEN '{}'::jsonb
                               ELSE jsonb_build_object('recipient', recipient) END)::text
            FROM tracked_events;
         SELECT setval(pg_get_serial_sequence('tracked_lines', 'id'),
                       COALESCE((SELECT MAX(id) FROM tracked_lines), 0) + 1, false);
         DROP TABLE tracked_events;",
        },
    ],
};

/// Every schema PostgreSQL holds, in the order they are migrated.
pub const ALL: &[&Schema] = &[&TRUSTED, &STATE, &SIGNATURES, &LIMITS, &TRACKING];
