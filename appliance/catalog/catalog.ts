import Database from 'better-sqlite3';
import { randomBytes } from 'node:crypto';
import { BlocksnapError } from '../../proto/errors.js';
import { MIGRATIONS } from './schema.js';
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
}
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

  static open(file: string): Catalog {
    let db: Database.Database;
    try {
      db = new Database(file);
    } catch (e) {
      throw new BlocksnapError('E_STORE_IO', `cannot open catalog ${file}`, { cause: e });
    }
    db.pragma('journal_mode = WAL');
    db.pragma('synchronous = FULL');
    db.pragma('foreign_keys = ON');
    db.pragma('busy_timeout = 5000');
    const version = db.pragma('user_version', { simple: true }) as number;
    for (let v = version; v < MIGRATIONS.length; v++) {
      db.transaction(() => {
        db.exec(MIGRATIONS[v]!);
        db.pragma(`user_version = ${v + 1}`);
      })();
    }
    return new Catalog(db);
  }

  close(): void {
    this.db.close();
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

  image(id: string): ImageRow | undefined {
    const r = this.db.prepare(`${IMAGE_SELECT} WHERE i.id = ?`).get(id);
    return r ? imageRow(r) : undefined;
  }

  /** The volume's last committed image: the only acceptable basis. */
  lastImage(volumeId: number): ImageRow | undefined {
    const r = this.db.prepare(`${IMAGE_SELECT} WHERE i.volume_id = ? ORDER BY i.created_at DESC, i.rowid DESC LIMIT 1`).get(volumeId);
    return r ? imageRow(r) : undefined;
  }

  listImages(filter: { agent?: string; volume?: string } = {}): ImageRow[] {
    const rows = this.db
      .prepare(`${IMAGE_SELECT} WHERE (? IS NULL OR a.name = ?) AND (? IS NULL OR v.name = ?) ORDER BY i.created_at, i.id`)
      .all(filter.agent ?? null, filter.agent ?? null, filter.volume ?? null, filter.volume ?? null);
    return (rows as any[]).map(imageRow);
  }

  imageIds(): Set<string> {
    return new Set((this.db.prepare('SELECT id FROM images').all() as { id: string }[]).map((r) => r.id));
  }
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

function imageRow(r: any): ImageRow {
  return {
    id: r.id, volumeId: r.volume_id, agent: r.agent, volume: r.volume, jobId: r.job_id, kind: r.kind,
    basisImageId: r.basis_image_id, rootDigest: r.root_digest, volumeSize: r.volume_size, chunkSize: r.chunk_size,
    createdAt: r.created_at, stats: r.stats_json ? JSON.parse(r.stats_json) : null,
    pg: r.pg_json ? JSON.parse(r.pg_json) : null,
    setId: r.set_id ?? null,
  };
}
