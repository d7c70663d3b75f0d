"""The schema of ``central.db``: numbered migrations, applied in order by
``common.sqlite.SqliteFile``.

``MIGRATIONS`` only ever grows: a ``central.db`` made by an earlier version is upgraded by
the entries after the ones it has, so a change to the schema is a new entry, never an
edit (tests/test_office_rooms.py pins each one).
"""

from __future__ import annotations

MIGRATIONS: tuple[str, ...] = (
    # 1: the initial schema.
    """
    CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
    CREATE TABLE streams (name TEXT PRIMARY KEY, seq INTEGER NOT NULL) WITHOUT ROWID;
    INSERT INTO streams VALUES ('all', 0);
    CREATE TABLE gateways (
        id TEXT PRIMARY KEY,
        site TEXT NOT NULL,
        site_key_path TEXT NOT NULL,     -- the key itself stays in its file
        list_version INTEGER NOT NULL DEFAULT 0,
        list_published_ms INTEGER,
        rev_seq INTEGER NOT NULL DEFAULT 0,
        cmd_seq INTEGER NOT NULL DEFAULT 0,
        hb_seq INTEGER NOT NULL DEFAULT 0,
        ack_seq INTEGER NOT NULL DEFAULT 0,
        acked_upto INTEGER NOT NULL DEFAULT 0,   -- highest contiguous event seq stored
        status TEXT,                     -- the last retained Status, JSON
        status_ms INTEGER,               -- when it was received
        applied_list_version INTEGER,    -- as last reported (applied message or status)
        applied_ms INTEGER,
        resync_requested_ms INTEGER,
        resync_reason TEXT,
        resync_answered_ms INTEGER,
        malformed INTEGER NOT NULL DEFAULT 0,
        created_ms INTEGER NOT NULL
    ) WITHOUT ROWID;
    CREATE TABLE entries (
        gateway TEXT NOT NULL REFERENCES gateways(id),
        cred BLOB NOT NULL,              -- HMAC-SHA256(site key, "cred\\0" + card id)
        permit BLOB,                     -- HMAC-SHA256(permit key, "permit\\0" + number)
        valid_from INTEGER,
        valid_until INTEGER,             -- exclusive
        doors TEXT,                      -- JSON list of door ids; NULL = every door
        schedule TEXT,                   -- NULL = always
        confirmed_at INTEGER,
        updated_ms INTEGER NOT NULL,
        PRIMARY KEY (gateway, cred)
    ) WITHOUT ROWID;
    CREATE TABLE revocations (
        gateway TEXT NOT NULL,           -- a gateway id, or '*' for every gateway
        kind TEXT NOT NULL CHECK (kind IN ('credential', 'permit')),
        hash BLOB NOT NULL,
        seq INTEGER NOT NULL,            -- the rev (or all) stream seq that carried it
        revoked_ms INTEGER NOT NULL,
        PRIMARY KEY (gateway, kind, hash)
    ) WITHOUT ROWID;
    CREATE TABLE applied (
        gateway TEXT NOT NULL,
        stream TEXT NOT NULL,
        seq INTEGER,
        status TEXT NOT NULL,
        reason TEXT,
        list_version INTEGER NOT NULL,
        ts_ms INTEGER NOT NULL,
        received_ms INTEGER NOT NULL,
        PRIMARY KEY (gateway, stream)
    ) WITHOUT ROWID;
    CREATE TABLE events (
        gateway TEXT NOT NULL,
        seq INTEGER NOT NULL,
        event_id TEXT NOT NULL,
        ts_ms INTEGER NOT NULL,
        kind TEXT NOT NULL,
        door TEXT,
        reader TEXT,
        direction TEXT,
        reason TEXT,
        cred TEXT,
        data TEXT NOT NULL,
        prev_hash TEXT NOT NULL,
        hash TEXT NOT NULL,
        received_ms INTEGER NOT NULL,
        PRIMARY KEY (gateway, seq)
    ) WITHOUT ROWID;
    CREATE TABLE requests (              -- one-shot commands handed to the running serve
        id INTEGER PRIMARY KEY,
        op TEXT NOT NULL,
        args TEXT NOT NULL,              -- JSON; hashes only, never a card or permit number
        requested_ms INTEGER NOT NULL,
        taken_ms INTEGER,                -- serve claimed it; the command waits for done_ms
        done_ms INTEGER,
        result TEXT,
        error_kind TEXT,                 -- NULL (ok), usage, failure, expired
        error TEXT
    );
    CREATE INDEX requests_open ON requests(id) WHERE done_ms IS NULL;
    CREATE TABLE chain_problems (
        gateway TEXT NOT NULL,
        seq INTEGER NOT NULL,
        problem TEXT NOT NULL,
        found_ms INTEGER NOT NULL,
        PRIMARY KEY (gateway, seq, problem)
    ) WITHOUT ROWID;
    """,
    # 2: enrollments made at gateways (docs/protocol.md, "Enrollments"). Additive only.
    """
    CREATE TABLE enrollments (
        gateway TEXT NOT NULL REFERENCES gateways(id),
        id TEXT NOT NULL,                -- the gateway's enrollment id (a UUID)
        seq INTEGER NOT NULL,            -- the seq of its tenant_enrolled event
        unit TEXT,
        cred BLOB,                       -- HMAC-SHA256(site key, card id), from the attachment
        permit TEXT,                     -- the permit number, unsealed and validated
        permit_hash BLOB,                -- HMAC-SHA256(permit key, "permit\\0" + number)
        lease_end INTEGER,               -- Unix s, exclusive
        provisional_until INTEGER,       -- Unix s
        account TEXT,                    -- who enrolled it at the gateway
        received_ms INTEGER NOT NULL,
        status TEXT NOT NULL CHECK (status IN
            ('received', 'held', 'confirmed', 'rejected', 'ended')),
        reason TEXT,                     -- held / rejected / ended: why
        decided_ms INTEGER,              -- confirmed or rejected at
        list_version INTEGER,            -- the list version that added or removed its card
        decision_seq INTEGER,            -- the enr seq that carried the decision; NULL: unsent
        elsewhere TEXT,                  -- JSON list: gateways that list the same permit
        ended_ms INTEGER,
        PRIMARY KEY (gateway, id)
    ) WITHOUT ROWID;
    CREATE INDEX enrollments_status ON enrollments(status, gateway);
    CREATE INDEX enrollments_permit ON enrollments(permit_hash);
    CREATE INDEX entries_permit ON entries(permit);
    ALTER TABLE gateways ADD COLUMN enr_seq INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE gateways ADD COLUMN tenant_upto INTEGER NOT NULL DEFAULT 0;
    -- Events stored before this migration are not acted on: a schema-1 office refused
    -- every batch that carried an attachment, so none of them holds an enrollment.
    UPDATE gateways SET tenant_upto = acked_upto;
    ALTER TABLE events ADD COLUMN attachment TEXT;
    -- Only tenant events enter it: finding the few due costs nothing per access event.
    CREATE INDEX events_tenant ON events(gateway, seq)
        WHERE kind IN ('tenant_enrolled', 'tenant_moved_out', 'tenant_lease_ended');
    """,
    # 3: the registry comparison, cases and retention (provisioning/reconcile/,
    # provisioning/retention.py; docs/registry.md, docs/privacy.md). Additive only. The
    # comparison's own rows (registry, cards, findings) are temporary tables of its
    # session (provisioning/db/sqlite_reconcile.py), never tables of this file.
    """
    CREATE TABLE daily_counts (          -- what retention folds old events into: no person
        gateway TEXT NOT NULL,
        day INTEGER NOT NULL,            -- days since 1970-01-01 in the office's zone
        entries INTEGER NOT NULL,        -- access_granted, direction entry
        exits INTEGER NOT NULL,          -- access_granted, direction exit
        denied INTEGER NOT NULL,         -- access_denied
        other INTEGER NOT NULL,          -- every other kind
        PRIMARY KEY (gateway, day)
    ) WITHOUT ROWID;
    CREATE INDEX daily_counts_day ON daily_counts(day);
    CREATE TABLE folded (                -- per gateway: the highest event seq folded
        gateway TEXT PRIMARY KEY,
        upto INTEGER NOT NULL
    ) WITHOUT ROWID;
    CREATE TABLE case_audit (            -- every look at one person's movements
        id INTEGER PRIMARY KEY,
        at_ms INTEGER NOT NULL,
        officer TEXT NOT NULL,
        reason TEXT NOT NULL,
        scope TEXT NOT NULL,             -- 'permit', or 'events <gateway>'
        permit_hash BLOB,                -- whose (the number is not kept here)
        shown INTEGER NOT NULL           -- how many events were shown
    );
    CREATE INDEX enrollments_cred ON enrollments(gateway, cred);
    -- Granted entries by card and time: "no entry for N days" is one seek per card, and
    -- entries per day are counted from the index alone. On an existing office this index
    -- is built once, when the new version first opens central.db.
    CREATE INDEX events_entries ON events(gateway, cred, ts_ms)
        WHERE kind = 'access_granted' AND direction = 'entry';
    """,
    # 4: site-key rotation (provisioning/site_rotation.py): the entries still under the
    # previous key of a gateway in change-over.
    """
    CREATE TABLE rekey_pending (
        gateway TEXT NOT NULL,
        cred BLOB NOT NULL,              -- an entry's hash under the previous site key
        PRIMARY KEY (gateway, cred)
    ) WITHOUT ROWID;
    """,
)
