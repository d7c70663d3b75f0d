"""The schema of the office's PostgreSQL database: numbered migrations, applied in order
by ``provisioning.db.postgres`` (under an advisory lock, so that several instances
starting at once migrate once).

``MIGRATIONS`` only ever grows, as ``sqlite_schema.MIGRATIONS`` does: a database made by
an earlier version is upgraded by the entries after the ones it has, so a change to the
schema is a new entry, never an edit (tests/test_office_pg.py pins each one).

The tables are those of ``central.db`` (provisioning/db/sqlite_schema.py), with these
differences, each for a city's volume:

- ``events`` is partitioned by day of the event's own time (``ts_ms``, UTC days): one
  partition per day from 2020 to 2100, made when the first event of the day arrives
  (``postgres.py``), and two catch-all partitions for times outside those years (a
  gateway whose clock is far off). A UNIQUE key on a partitioned table must include the
  partition column, so the key is ``(gateway, seq, ts_ms)``; a re-sent event carries the
  same time, so the key still catches it, and ``store_events`` finds a stored seq by
  ``(gateway, seq)`` whatever its time (postgres.py says how without reading every
  partition).
- ``gateways`` also keeps what ``store_events`` needs to know about the stored seqs
  without reading ``events``: the runs stored above ``acked_upto``, the gaps declared by
  ``events_dropped`` events stored above it, the hash and time of the event at
  ``acked_upto``, how many events are stored and the highest seq.
- ``tenant_event_keys`` lists the stored tenant events (``TENANT_KINDS``), so finding
  the few due costs nothing per access event and nothing per partition.
- ``requests.taken_by``: the server process id of the ``serve`` that took a request, so
  that a request taken by a ``serve`` that died is closed while other instances run.
- Identifiers that reports sort by are ``COLLATE "C"`` (byte order, as SQLite sorts).
"""

from __future__ import annotations

FIRST_DAY_MS = 1_577_836_800_000
"""2020-01-01T00:00Z: events before it go to ``events_before``."""
END_DAY_MS = 4_102_444_800_000
"""2100-01-01T00:00Z: events from it on go to ``events_after``."""

MIGRATIONS: tuple[str, ...] = (
    # 1: the initial schema (central.db's schema 2, for a city).
    """
    CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    CREATE TABLE streams (name TEXT PRIMARY KEY, seq BIGINT NOT NULL);
    INSERT INTO streams VALUES ('all', 0);
    CREATE TABLE gateways (
        id TEXT COLLATE "C" PRIMARY KEY,
        site TEXT NOT NULL,
        site_key_path TEXT NOT NULL,     -- the key itself stays in its file
        list_version BIGINT NOT NULL DEFAULT 0,
        list_published_ms BIGINT,
        rev_seq BIGINT NOT NULL DEFAULT 0,
        cmd_seq BIGINT NOT NULL DEFAULT 0,
        hb_seq BIGINT NOT NULL DEFAULT 0,
        ack_seq BIGINT NOT NULL DEFAULT 0,
        acked_upto BIGINT NOT NULL DEFAULT 0,   -- highest contiguous event seq stored
        status TEXT,                     -- the last retained Status, JSON
        status_ms BIGINT,
        applied_list_version BIGINT,
        applied_ms BIGINT,
        resync_requested_ms BIGINT,
        resync_reason TEXT,
        resync_answered_ms BIGINT,
        malformed BIGINT NOT NULL DEFAULT 0,
        created_ms BIGINT NOT NULL,
        enr_seq BIGINT NOT NULL DEFAULT 0,
        tenant_upto BIGINT NOT NULL DEFAULT 0,
        -- [first, last, first, last, ...]: runs of seqs stored above acked_upto
        stored_above BIGINT[] NOT NULL DEFAULT '{}',
        -- [first_seq, last_seq, seq, ...]: events_dropped stored above acked_upto
        declared_gaps BIGINT[] NOT NULL DEFAULT '{}',
        head_hash TEXT,                  -- hash and time of the event at acked_upto,
        head_ts_ms BIGINT,               -- when known
        event_count BIGINT NOT NULL DEFAULT 0,
        highest_seq BIGINT
    );
    CREATE TABLE entries (
        gateway TEXT COLLATE "C" NOT NULL REFERENCES gateways(id),
        cred BYTEA NOT NULL,             -- HMAC-SHA256(site key, "cred\\0" + card id)
        permit BYTEA,                    -- HMAC-SHA256(permit key, "permit\\0" + number)
        valid_from BIGINT,
        valid_until BIGINT,              -- exclusive
        doors TEXT,                      -- JSON list of door ids; NULL = every door
        schedule TEXT,                   -- NULL = always
        confirmed_at BIGINT,
        updated_ms BIGINT NOT NULL,
        PRIMARY KEY (gateway, cred)
    );
    CREATE INDEX entries_permit ON entries(permit);
    CREATE TABLE revocations (
        gateway TEXT COLLATE "C" NOT NULL,   -- a gateway id, or '*' for every gateway
        kind TEXT NOT NULL CHECK (kind IN ('credential', 'permit')),
        hash BYTEA NOT NULL,
        seq BIGINT NOT NULL,
        revoked_ms BIGINT NOT NULL,
        PRIMARY KEY (gateway, kind, hash)
    );
    CREATE TABLE applied (
        gateway TEXT COLLATE "C" NOT NULL,
        stream TEXT COLLATE "C" NOT NULL,
        seq BIGINT,
        status TEXT NOT NULL,
        reason TEXT,
        list_version BIGINT NOT NULL,
        ts_ms BIGINT NOT NULL,
        received_ms BIGINT NOT NULL,
        PRIMARY KEY (gateway, stream)
    );
    CREATE TABLE events (
        gateway TEXT COLLATE "C" NOT NULL,
        seq BIGINT NOT NULL,
        event_id TEXT NOT NULL,
        ts_ms BIGINT NOT NULL,           -- the gateway's clock: the partition key
        kind TEXT NOT NULL,
        door TEXT,
        reader TEXT,
        direction TEXT,
        reason TEXT,
        cred TEXT,
        data TEXT NOT NULL,              -- JSON text as received (canonical), byte-exact
        prev_hash TEXT NOT NULL,
        hash TEXT NOT NULL,
        received_ms BIGINT NOT NULL,
        attachment TEXT,
        PRIMARY KEY (gateway, seq, ts_ms)
    ) PARTITION BY RANGE (ts_ms);
    -- Before 2020-01-01T00:00Z and from 2100-01-01T00:00Z on (FIRST_DAY_MS, END_DAY_MS).
    CREATE TABLE events_before PARTITION OF events
        FOR VALUES FROM (MINVALUE) TO (1577836800000);
    CREATE TABLE events_after PARTITION OF events
        FOR VALUES FROM (4102444800000) TO (MAXVALUE);
    CREATE TABLE tenant_event_keys (
        gateway TEXT COLLATE "C" NOT NULL,
        seq BIGINT NOT NULL,
        ts_ms BIGINT NOT NULL,
        PRIMARY KEY (gateway, seq)
    );
    CREATE TABLE requests (              -- one-shot commands handed to a running serve
        id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        op TEXT NOT NULL,
        args TEXT NOT NULL,
        requested_ms BIGINT NOT NULL,
        taken_ms BIGINT,
        taken_by INTEGER,                -- the server pid of the serve that took it
        done_ms BIGINT,
        result TEXT,
        error_kind TEXT,
        error TEXT
    );
    CREATE INDEX requests_open ON requests(id) WHERE done_ms IS NULL;
    CREATE TABLE chain_problems (
        gateway TEXT COLLATE "C" NOT NULL,
        seq BIGINT NOT NULL,
        problem TEXT COLLATE "C" NOT NULL,
        found_ms BIGINT NOT NULL,
        PRIMARY KEY (gateway, seq, problem)
    );
    CREATE TABLE enrollments (
        gateway TEXT COLLATE "C" NOT NULL REFERENCES gateways(id),
        id TEXT NOT NULL,
        seq BIGINT NOT NULL,
        unit TEXT,
        cred BYTEA,
        permit TEXT,
        permit_hash BYTEA,
        lease_end BIGINT,
        provisional_until BIGINT,
        account TEXT,
        received_ms BIGINT NOT NULL,
        status TEXT NOT NULL CHECK (status IN
            ('received', 'held', 'confirmed', 'rejected', 'ended')),
        reason TEXT,
        decided_ms BIGINT,
        list_version BIGINT,
        decision_seq BIGINT,
        elsewhere TEXT,
        ended_ms BIGINT,
        PRIMARY KEY (gateway, id)
    );
    CREATE INDEX enrollments_status ON enrollments(status, gateway);
    CREATE INDEX enrollments_permit ON enrollments(permit_hash);
    CREATE INDEX enrollments_due ON enrollments(gateway, seq)
        WHERE decision_seq IS NULL AND status IN ('confirmed', 'rejected');
    """,
    # 2: the registry comparison, cases and retention (central.db's migration 3; the
    # comparison's own rows are temporary tables of its session,
    # provisioning/db/postgres_comparison.py). Additive only.
    """
    CREATE TABLE daily_counts (          -- what retention folds old events into: no person
        gateway TEXT COLLATE "C" NOT NULL,
        day INTEGER NOT NULL,            -- days since 1970-01-01 in the office's zone
        entries BIGINT NOT NULL,
        exits BIGINT NOT NULL,
        denied BIGINT NOT NULL,
        other BIGINT NOT NULL,
        PRIMARY KEY (gateway, day)
    );
    CREATE INDEX daily_counts_day ON daily_counts(day);
    CREATE TABLE folded (                -- per gateway: the highest event seq folded
        gateway TEXT PRIMARY KEY,
        upto BIGINT NOT NULL
    );
    CREATE TABLE case_audit (            -- every look at one person's movements
        id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        at_ms BIGINT NOT NULL,
        officer TEXT NOT NULL,
        reason TEXT NOT NULL,
        scope TEXT NOT NULL,
        permit_hash BYTEA,
        shown INTEGER NOT NULL
    );
    CREATE INDEX enrollments_cred ON enrollments(gateway, cred);
    -- On the partitioned table: every day partition gets it (made, or attached, later).
    CREATE INDEX events_entries ON events(gateway, cred, ts_ms)
        WHERE kind = 'access_granted' AND direction = 'entry';
    """,
    # 3: site-key rotation (central.db's migration 4).
    """
    CREATE TABLE rekey_pending (
        gateway TEXT COLLATE "C" NOT NULL,
        cred BYTEA NOT NULL,             -- an entry's hash under the previous site key
        PRIMARY KEY (gateway, cred)
    );
    """,
)
