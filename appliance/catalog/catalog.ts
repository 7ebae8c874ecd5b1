import Database from 'better-sqlite3';
import { randomBytes } from 'node:crypto';
import { BlocksnapError } from '../../proto/errors.js';
import { MIGRATIONS } from './schema.js';
import { openPrivateDatabase } from '../store/private-sqlite.js';
import { credentialOf, hashToken, newToken, tokenMatches, type Credential } from './token.js';

/**
 * The appliance catalog: agents, volumes, jobs and images in SQLite.
 *
 * The catalog is an index of the store, not the truth about images: an
 * image exists when its manifest is in the store (DESIGN.md §5), and
 * `insertImage` is idempotent so start-up roll-forward and `catalog rebuild`
 * can replay manifests at any time.
 */
export interface AgentRow { id: number; name: string; createdAt: string }
export interface VolumeRow { id: number; agentId: number; agent: string; name: string; size: number; chunkSize: number }
export type JobState = 'queued' | 'running' | 'committed' | 'failed' | 'cancelled';
export interface JobRow {
  id: string; agentId: number; agent: string; volumeName: string; volumeId: number | null;
  kind: string; state: JobState; createdAt: string; endedAt: string | null; imageId: string | null;
  errorCode: string | null; errorMessage: string | null; stats: Record<string, unknown> | null;
}
export interface ImageRow {
  id: string; volumeId: number; agent: string; volume: string; jobId: string | null; kind: string;
  basisImageId: string | null; rootDigest: string; volumeSize: number; chunkSize: number;
  createdAt: string; stats: Record<string, unknown> | null;
  /** PostgreSQL label, LSNs and WAL of an app-consistent image (PgImageInfo), null if crash-consistent. */
  pg: Record<string, unknown> | null;
  /** The image set (consistency group) the image was committed in; null for a lone volume's image. */
  setId: string | null;
  /** Damaged objects the image needs (DESIGN.md §6); empty for a healthy image. */
  damage: ImageDamage[];
}
export interface ImageDamage { object: string; reason: string; detectedAt: string }
export interface NewImage {
  id: string; agent: string; volume: string; jobId: string | null; kind: string;
  basisImageId: string | null; rootDigest: string; volumeSize: number; chunkSize: number;
  createdAt: string; stats?: Record<string, unknown> | null;
  pg?: object | null;
  setId?: string | null;
}

const now = () => new Date().toISOString();

export class Catalog {
  private readonly db: Database.Database;

  private constructor(db: Database.Database) {
    this.db = db;
  }

  /**
   * Opens (creating if missing, 0600) and migrates the catalog. A file SQLite
   * cannot read, or one failing `PRAGMA quick_check` (a few ms: the catalog
   * is small), is E_STORE_CORRUPT: `catalog rebuild` and the appliance's
   * start move it aside and rebuild it from the manifests.
   */
  static open(file: string): Catalog {
    let db: Database.Database | undefined;
    try {
      db = openPrivateDatabase(file);
      db.pragma('busy_timeout = 5000');
      db.pragma('journal_mode = WAL');
      db.pragma('synchronous = FULL');
      db.pragma('foreign_keys = ON');
      const check = db.pragma('quick_check', { simple: true });
      if (check !== 'ok') throw Object.assign(new Error(`quick_check: ${String(check)}`), { code: 'SQLITE_CORRUPT' });
      const version = db.pragma('user_version', { simple: true }) as number;
      for (let v = version; v < MIGRATIONS.length; v++) {
        db.transaction(() => {
          db!.exec(MIGRATIONS[v]!);
          db!.pragma(`user_version = ${v + 1}`);
        })();
      }
    } catch (e) {
      db?.close();
      const code = String((e as { code?: string }).code ?? '');
      const unreadable = code.startsWith('SQLITE_CORRUPT') || code.startsWith('SQLITE_NOTADB');
      throw new BlocksnapError(unreadable ? 'E_STORE_CORRUPT' : 'E_STORE_IO',
        `cannot open catalog ${file}: ${(e as Error).message}${unreadable ? ' (blocksnap-appliance catalog rebuild recreates it from the store)' : ''}`, { cause: e });
    }
    return new Catalog(db);
  }

  /**
   * What can still be read from an unreadable catalog: its agents (names and
   * credentials), so a rebuild keeps the agents able to log in. Best effort:
   * an empty list if that table is unreadable too.
   */
  static salvageAgents(file: string): { name: string; tokenHash: string; createdAt: string }[] {
    let db: Database.Database | undefined;
    try {
      db = new Database(file, { readonly: true, fileMustExist: true });
      return (db.prepare('SELECT name, token_hash, created_at FROM agents').all() as any[]).map((r) => ({
        name: String(r.name), tokenHash: String(r.token_hash), createdAt: String(r.created_at),
      }));
    } catch {
      return [];
    } finally {
      db?.close();
    }
  }

  /** Re-inserts salvaged agents (catalog rebuild after an unreadable catalog). */
  restoreAgents(agents: { name: string; tokenHash: string; createdAt: string }[]): number {
    const ins = this.db.prepare('INSERT OR IGNORE INTO agents (name, token_hash, created_at) VALUES (?, ?, ?)');
    let n = 0;
    this.db.transaction(() => {
      for (const a of agents) n += ins.run(a.name, a.tokenHash, a.createdAt).changes;
    })();
    return n;
  }

  close(): void {
    this.db.close();
  }

  /** The database, for companion tables kept in their own modules (mounts: appliance/mounts/mount-catalog.ts). */
  get database(): Database.Database {
    return this.db;
  }

  // ---- agents -------------------------------------------------------------

  /** Creates an agent and returns its token (shown once, stored hashed). */
  addAgent(name: string): string {
    if (!/^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$/.test(name)) {
      throw new BlocksnapError('E_USAGE', `invalid agent name ${JSON.stringify(name)}: use letters, digits, . _ - (max 63)`);
    }
    const token = newToken();
    try {
      this.db.prepare('INSERT INTO agents (name, token_hash, created_at) VALUES (?, ?, ?)').run(name, hashToken(token), now());
    } catch (e) {
      throw new BlocksnapError('E_USAGE', `agent ${name} already exists`, { cause: e });
    }
    return token;
  }

  /** Replaces an agent's token (the old one stops working at once). */
  rotateToken(name: string): string {
    const token = newToken();
    const r = this.db.prepare('UPDATE agents SET token_hash = ? WHERE name = ?').run(hashToken(token), name);
    if (r.changes === 0) throw new BlocksnapError('E_NOT_FOUND', `no agent ${name}`);
    return token;
  }

  /** The agent if name and token match (sync key derivation: CLI and tests; the appliance uses `credential`). */
  authenticate(name: string, token: string): AgentRow | undefined {
    const c = this.db.prepare('SELECT token_hash FROM agents WHERE name = ?').get(name) as { token_hash: string } | undefined;
    return c && tokenMatches(token, c.token_hash) ? this.agent(name) : undefined;
  }

  /** The agent and its stored credential (a SCRAM verifier, DESIGN.md §4.2), or undefined for an unknown name. */
  credential(name: string): { agent: AgentRow; credential: Credential } | undefined {
    const r = this.db.prepare('SELECT id, name, token_hash, created_at FROM agents WHERE name = ?').get(name) as
      | { id: number; name: string; token_hash: string; created_at: string }
      | undefined;
    return r && { agent: { id: r.id, name: r.name, createdAt: r.created_at }, credential: credentialOf(r.token_hash) };
  }

  agent(name: string): AgentRow | undefined {
    const r = this.db.prepare('SELECT id, name, created_at FROM agents WHERE name = ?').get(name) as
      | { id: number; name: string; created_at: string }
      | undefined;
    return r && { id: r.id, name: r.name, createdAt: r.created_at };
  }

  listAgents(): AgentRow[] {
    return (this.db.prepare('SELECT id, name, created_at FROM agents ORDER BY name').all() as any[]).map((r) => ({
      id: r.id, name: r.name, createdAt: r.created_at,
    }));
  }

  // ---- volumes ------------------------------------------------------------

  upsertVolume(agentId: number, name: string, size: number, chunkSize: number): VolumeRow {
    this.db
      .prepare(
        `INSERT INTO volumes (agent_id, name, size, chunk_size) VALUES (?, ?, ?, ?)
         ON CONFLICT (agent_id, name) DO UPDATE SET size = excluded.size, chunk_size = excluded.chunk_size`,
      )
      .run(agentId, name, size, chunkSize);
    return this.volume(agentId, name)!;
  }

  volume(agentId: number, name: string): VolumeRow | undefined {
    const r = this.db
      .prepare(
        `SELECT v.id, v.agent_id, a.name AS agent, v.name, v.size, v.chunk_size FROM volumes v
         JOIN agents a ON a.id = v.agent_id WHERE v.agent_id = ? AND v.name = ?`,
      )
      .get(agentId, name) as any;
    return r && { id: r.id, agentId: r.agent_id, agent: r.agent, name: r.name, size: r.size, chunkSize: r.chunk_size };
  }

  // ---- jobs ---------------------------------------------------------------

  createJob(agentId: number, volumeName: string, kind: string): JobRow {
    const id = `job-${Date.now().toString(36)}-${randomBytes(4).toString('hex')}`;
    this.db
      .prepare('INSERT INTO jobs (id, agent_id, volume_name, kind, state, created_at) VALUES (?, ?, ?, ?, ?, ?)')
      .run(id, agentId, volumeName, kind, 'queued', now());
    return this.job(id)!;
  }

  setJobState(id: string, state: JobState, patch: { volumeId?: number; kind?: string } = {}): void {
    this.db
      .prepare('UPDATE jobs SET state = ?, volume_id = COALESCE(?, volume_id), kind = COALESCE(?, kind) WHERE id = ?')
      .run(state, patch.volumeId ?? null, patch.kind ?? null, id);
  }

  finishJob(
    id: string,
    outcome: { state: 'committed' | 'failed' | 'cancelled'; imageId?: string; errorCode?: string; errorMessage?: string; stats?: unknown },
  ): void {
    this.db
      .prepare(
        `UPDATE jobs SET state = ?, ended_at = ?, image_id = ?, error_code = ?, error_message = ?,
         stats_json = COALESCE(?, stats_json) WHERE id = ?`,
      )
      .run(
        outcome.state, now(), outcome.imageId ?? null, outcome.errorCode ?? null, outcome.errorMessage ?? null,
        outcome.stats === undefined ? null : JSON.stringify(outcome.stats), id,
      );
  }

  /** Jobs left running by a previous appliance process can never finish. */
  failInterruptedJobs(): number {
    return this.db
      .prepare(`UPDATE jobs SET state = 'failed', ended_at = ?, error_code = 'E_INTERRUPTED',
                error_message = 'appliance restarted during the job' WHERE state IN ('queued', 'running')`)
      .run(now()).changes;
  }

  job(id: string): JobRow | undefined {
    const r = this.db.prepare(`SELECT j.*, a.name AS agent FROM jobs j JOIN agents a ON a.id = j.agent_id WHERE j.id = ?`).get(id);
    return r ? jobRow(r) : undefined;
  }

  listJobs(limit = 100): JobRow[] {
    return (this.db
      .prepare(`SELECT j.*, a.name AS agent FROM jobs j JOIN agents a ON a.id = j.agent_id ORDER BY j.created_at DESC, j.id DESC LIMIT ?`)
      .all(limit) as any[]).map(jobRow);
  }

  // ---- images -------------------------------------------------------------

  /**
   * Idempotent: replaying the same manifest is a no-op. With `createAgent`
   * (catalog rebuild) an unknown agent is recreated with no usable token:
   * its images are visible, and `agents rotate` gives it a credential again.
   */
  insertImage(img: NewImage, opts: { createAgent?: boolean } = {}): void {
    this.db.transaction(() => {
      let agent = this.agent(img.agent);
      if (!agent && opts.createAgent) {
        this.db.prepare('INSERT INTO agents (name, token_hash, created_at) VALUES (?, ?, ?)').run(img.agent, 'disabled', now());
        agent = this.agent(img.agent);
      }
      if (!agent) throw new BlocksnapError('E_NOT_FOUND', `image ${img.id} belongs to unknown agent ${img.agent}`);
      let vol = this.volume(agent.id, img.volume);
      if (!vol) vol = this.upsertVolume(agent.id, img.volume, img.volumeSize, img.chunkSize);
      this.db
        .prepare(
          `INSERT INTO images (id, volume_id, job_id, kind, basis_image_id, root_digest, volume_size, chunk_size, created_at, stats_json, pg_json, set_id)
           VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO NOTHING`,
        )
        .run(img.id, vol.id, img.jobId, img.kind, img.basisImageId, img.rootDigest, img.volumeSize, img.chunkSize,
          img.createdAt, img.stats ? JSON.stringify(img.stats) : null, img.pg ? JSON.stringify(img.pg) : null, img.setId ?? null);
    })();
  }

  /** Every member image of a set in one transaction: the catalog never lists part of a set. */
  insertImages(imgs: NewImage[], opts: { createAgent?: boolean } = {}): void {
    this.db.transaction(() => {
      for (const img of imgs) this.insertImage(img, opts);
    })();
  }

  /** An image; a damaged image known only by its quarantined manifest comes back as a placeholder (see listImages). */
  image(id: string): ImageRow | undefined {
    const damage = this.damageOf(id);
    const r = this.db.prepare(`${IMAGE_SELECT} WHERE i.id = ?`).get(id);
    if (r) return imageRow(r, damage);
    return damage.length ? lostImage(id, damage) : undefined;
  }

  /**
   * The volume's last committed image: the only acceptable basis. A damaged
   * image is never a basis (an incremental on it would inherit the damage),
   * so the next backup of its volume is a full.
   */
  lastImage(volumeId: number): ImageRow | undefined {
    const r = this.db.prepare(`${IMAGE_SELECT} WHERE i.volume_id = ? ORDER BY i.created_at DESC, i.rowid DESC LIMIT 1`).get(volumeId) as any;
    if (!r) return undefined;
    const damage = this.damageOf(r.id);
    return damage.length ? undefined : imageRow(r, damage);
  }

  /**
   * Images with their damage. Without a filter, an image whose manifest was
   * quarantined before it got a row is listed too, as a placeholder (empty
   * agent, volume and root, kind "unknown") carrying its damage: it was
   * committed, so it must not silently disappear.
   */
  listImages(filter: { agent?: string; volume?: string } = {}): ImageRow[] {
    const rows = this.db
      .prepare(`${IMAGE_SELECT} WHERE (? IS NULL OR a.name = ?) AND (? IS NULL OR v.name = ?) ORDER BY i.created_at, i.id`)
      .all(filter.agent ?? null, filter.agent ?? null, filter.volume ?? null, filter.volume ?? null) as any[];
    const damage = this.damagedImages();
    const out = rows.map((r) => imageRow(r, damage.get(r.id) ?? []));
    if (filter.agent === undefined && filter.volume === undefined) {
      const have = new Set(rows.map((r) => r.id as string));
      for (const [id, d] of damage) if (!have.has(id)) out.push(lostImage(id, d));
      out.sort((a, b) => (a.createdAt === b.createdAt ? (a.id < b.id ? -1 : 1) : a.createdAt < b.createdAt ? -1 : 1));
    }
    return out;
  }

  imageIds(): Set<string> {
    return new Set((this.db.prepare('SELECT id FROM images').all() as { id: string }[]).map((r) => r.id));
  }

  /** True if a committed image has this root (start-up resolution of pending packs, DESIGN.md §5). */
  hasRoot(rootHex: string): boolean {
    return this.db.prepare('SELECT 1 FROM images WHERE root_digest = ? LIMIT 1').get(rootHex) !== undefined;
  }

  // ---- damage (DESIGN.md §6) ----------------------------------------------

  /** Records that `imageId` needs a damaged or missing `object`; idempotent (the first detection, which knows most, is kept). */
  recordDamage(imageId: string, object: string, reason: string): void {
    this.db
      .prepare(`INSERT INTO image_damage (image_id, object, reason, detected_at) VALUES (?, ?, ?, ?)
                ON CONFLICT (image_id, object) DO NOTHING`)
      .run(imageId, object, reason, now());
  }

  /** Forgets an image's damage (verify found it whole). */
  clearDamage(imageId: string): void {
    this.db.prepare('DELETE FROM image_damage WHERE image_id = ?').run(imageId);
  }

  damageOf(imageId: string): ImageDamage[] {
    return (this.db.prepare('SELECT object, reason, detected_at FROM image_damage WHERE image_id = ? ORDER BY object').all(imageId) as any[])
      .map((r) => ({ object: r.object, reason: r.reason, detectedAt: r.detected_at }));
  }

  damagedImages(): Map<string, ImageDamage[]> {
    const out = new Map<string, ImageDamage[]>();
    for (const r of this.db.prepare('SELECT image_id, object, reason, detected_at FROM image_damage ORDER BY image_id, object').all() as any[]) {
      let l = out.get(r.image_id);
      if (!l) out.set(r.image_id, (l = []));
      l.push({ object: r.object, reason: r.reason, detectedAt: r.detected_at });
    }
    return out;
  }
}

/** A committed image known only from its damage rows (its manifest was quarantined before it got a catalog row). */
function lostImage(id: string, damage: ImageDamage[]): ImageRow {
  const m = /^img-(\d{4})(\d{2})(\d{2})t(\d{2})(\d{2})(\d{2})z-/.exec(id);
  const createdAt = m ? `${m[1]}-${m[2]}-${m[3]}T${m[4]}:${m[5]}:${m[6]}.000Z` : damage[0]!.detectedAt;
  return {
    id, volumeId: 0, agent: '', volume: '', jobId: null, kind: 'unknown', basisImageId: null, rootDigest: '',
    volumeSize: 0, chunkSize: 0, createdAt, stats: null, pg: null, setId: null, damage,
  };
}

const IMAGE_SELECT = `SELECT i.*, a.name AS agent, v.name AS volume FROM images i
  JOIN volumes v ON v.id = i.volume_id JOIN agents a ON a.id = v.agent_id`;

function jobRow(r: any): JobRow {
  return {
    id: r.id, agentId: r.agent_id, agent: r.agent, volumeName: r.volume_name, volumeId: r.volume_id, kind: r.kind,
    state: r.state, createdAt: r.created_at, endedAt: r.ended_at, imageId: r.image_id, errorCode: r.error_code,
    errorMessage: r.error_message, stats: r.stats_json ? JSON.parse(r.stats_json) : null,
  };
}

function imageRow(r: any, damage: ImageDamage[] = []): ImageRow {
  return {
    id: r.id, volumeId: r.volume_id, agent: r.agent, volume: r.volume, jobId: r.job_id, kind: r.kind,
    basisImageId: r.basis_image_id, rootDigest: r.root_digest, volumeSize: r.volume_size, chunkSize: r.chunk_size,
    createdAt: r.created_at, stats: r.stats_json ? JSON.parse(r.stats_json) : null,
    pg: r.pg_json ? JSON.parse(r.pg_json) : null,
    setId: r.set_id ?? null,
    damage,
  };
}
