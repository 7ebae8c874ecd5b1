/**
 * Catalog schema. Plain, portable SQL (no SQLite-only types or functions in
 * queries) so the same statements can later run against a shared PostgreSQL
 * catalog. Migrations are append-only; `user_version` records the last one.
 */
export const MIGRATIONS: string[] = [
  `CREATE TABLE agents (
     id INTEGER PRIMARY KEY,
     name TEXT NOT NULL UNIQUE,
     token_hash TEXT NOT NULL,
     created_at TEXT NOT NULL
   );
   CREATE TABLE volumes (
     id INTEGER PRIMARY KEY,
     agent_id INTEGER NOT NULL REFERENCES agents(id),
     name TEXT NOT NULL,
     size INTEGER NOT NULL,
     chunk_size INTEGER NOT NULL,
     UNIQUE (agent_id, name)
   );
   CREATE TABLE jobs (
     id TEXT PRIMARY KEY,
     agent_id INTEGER NOT NULL REFERENCES agents(id),
     volume_id INTEGER REFERENCES volumes(id),
     volume_name TEXT NOT NULL,
     kind TEXT NOT NULL,
     state TEXT NOT NULL,
     created_at TEXT NOT NULL,
     ended_at TEXT,
     image_id TEXT,
     error_code TEXT,
     error_message TEXT,
     stats_json TEXT
   );
   CREATE TABLE images (
     id TEXT PRIMARY KEY,
     volume_id INTEGER NOT NULL REFERENCES volumes(id),
     job_id TEXT,
     kind TEXT NOT NULL,
     basis_image_id TEXT,
     root_digest TEXT NOT NULL,
     volume_size INTEGER NOT NULL,
     chunk_size INTEGER NOT NULL,
     created_at TEXT NOT NULL,
     stats_json TEXT
   );
   CREATE INDEX images_by_volume ON images(volume_id, created_at);
   CREATE INDEX jobs_by_created ON jobs(created_at);`,
  // 2: the PostgreSQL part of app-consistent images (label, LSNs, WAL pieces).
  `ALTER TABLE images ADD COLUMN pg_json TEXT;`,
  // 3: consistency groups: the image set an image was committed in (null for a lone volume).
  `ALTER TABLE images ADD COLUMN set_id TEXT;`,
  // 4: damaged images (DESIGN.md §6): one row per damaged object an image needs. No foreign
  // key: an image whose manifest was quarantined before it got a row is recorded too.
  // images_by_root: start-up asks "is this root committed?" per pending writer (§5).
  `CREATE TABLE image_damage (
     image_id TEXT NOT NULL,
     object TEXT NOT NULL,
     reason TEXT NOT NULL,
     detected_at TEXT NOT NULL,
     PRIMARY KEY (image_id, object)
   );
   CREATE INDEX images_by_root ON images(root_digest);`,
  // 5: instant mounts (DESIGN.md §6.2, appliance/mounts/mount-catalog.ts): one row per mount, one per
  // exported volume. export_name is the NBD secret (128 random bits); overlay names a directory under
  // DATA/mounts/ derived from the server-made mount id only. image_ref: an image id or an image set id.
  `CREATE TABLE mounts (
     id TEXT PRIMARY KEY,
     image_ref TEXT NOT NULL,
     agent_id INTEGER NOT NULL REFERENCES agents(id),
     peer_address TEXT NOT NULL,
     writable INTEGER NOT NULL,
     requested_by TEXT NOT NULL,
     created_at TEXT NOT NULL,
     expires_at TEXT,
     state TEXT NOT NULL,
     ended_at TEXT,
     end_reason TEXT
   );
   CREATE TABLE mount_exports (
     mount_id TEXT NOT NULL REFERENCES mounts(id),
     volume TEXT NOT NULL,
     image_id TEXT NOT NULL,
     export_name TEXT NOT NULL UNIQUE,
     overlay TEXT,
     PRIMARY KEY (mount_id, volume)
   );
   CREATE INDEX mounts_by_state ON mounts(state);
   CREATE INDEX mount_exports_by_image ON mount_exports(image_id);`,
  // 6: retention (DESIGN.md §11, appliance/retention/retention-catalog.ts): pinned images, per-volume
  // keep policies, and image deletions in progress (a tombstone outlives its manifest's removal, so
  // roll-forward never brings a deleted image back after a crash).
  `CREATE TABLE image_pins (
     image_id TEXT PRIMARY KEY,
     pinned_at TEXT NOT NULL
   );
   CREATE TABLE retention_policies (
     agent TEXT NOT NULL,
     volume TEXT NOT NULL,
     keep_last INTEGER NOT NULL DEFAULT 0,
     keep_hourly INTEGER NOT NULL DEFAULT 0,
     keep_daily INTEGER NOT NULL DEFAULT 0,
     keep_weekly INTEGER NOT NULL DEFAULT 0,
     keep_monthly INTEGER NOT NULL DEFAULT 0,
     keep_yearly INTEGER NOT NULL DEFAULT 0,
     updated_at TEXT NOT NULL,
     PRIMARY KEY (agent, volume)
   );
   CREATE TABLE image_deletions (
     image_id TEXT PRIMARY KEY,
     deleted_at TEXT NOT NULL
   );`,
  // 7: restore verifications (`verify IMAGE --restore --on AGENT`, appliance/ops/verify-restore.ts): one row
  // per run and image (a set's members each get one); result is the JSON of the agent's check.
  `CREATE TABLE restore_verifications (
     image_id TEXT NOT NULL,
     verified_at TEXT NOT NULL,
     agent TEXT NOT NULL,
     ok INTEGER NOT NULL,
     reason TEXT,
     result TEXT NOT NULL,
     PRIMARY KEY (image_id, verified_at)
   );`,
];
