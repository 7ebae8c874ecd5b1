/**
 * Mounts as catalog objects (issue 9 item 3, DESIGN.md §6.2). The manager
 * creates a mount (an NBD export name per volume, unguessable: 128 random
 * bits, never derived from the image), is the NBD server's export resolver
 * (only names it handed out, only to the address it handed them to, only
 * while the mount is live and not expired), removes mounts (their overlays
 * deleted) and sweeps expired ones. Overlays live in DATA/mounts/, one
 * directory per exported volume, named by the server-made mount id only.
 *
 * Restart policy: a mount's NBD connections die with the appliance process,
 * and an overlay without its connection has no writer left to serve. So at
 * start every mount still active in the catalog is ended (reason recorded)
 * and every overlay directory of ours in DATA/mounts/ is removed: a client
 * must ask for a new mount.
 */
import { randomBytes } from 'node:crypto';
import { readdir, rm } from 'node:fs/promises';
import { join } from 'node:path';
import type { Logger } from 'pino';
import { BlocksnapError, toBlocksnapError } from '../../proto/errors.js';
import { makePrivateDir } from '../../proto/shared/durable-file.js';
import type { AgentRow, Catalog, ImageRow } from '../catalog/catalog.js';
import type { NbdExport, NbdExportResolver, NbdPeer } from '../nbd/nbd-export.js';
import type { PgImageInfo } from '../store/pg-image-info.js';
import type { MountBackend, MountImage, OpenedExport } from './mount-backend.js';
import { MountCatalog, type MountRequester, type MountRow } from './mount-catalog.js';

export const MOUNTS_DIR = 'mounts';
/** Mount ids are made here; overlay directory names are `<mount id>.<member index>` and nothing else. */
const MOUNT_ID_RE = /^mnt-[0-9a-z]{1,12}-[0-9a-f]{12}$/;
const OVERLAY_RE = /^(mnt-[0-9a-z]{1,12}-[0-9a-f]{12})\.(\d{1,2})$/;
/** 16 random bytes, hex: 128 bits an attacker would have to guess. */
export const EXPORT_NAME_BYTES = 16;

export interface MountLimits {
  /** Live mounts per agent. */
  perAgent: number;
  /** Live mounts in all. */
  total: number;
  /** Longest ttl a mount may ask for (s). */
  maxTtlSeconds: number;
}

export interface MountManagerOptions {
  catalog: Catalog;
  backend: MountBackend;
  dataDir: string;
  log: Logger;
  limits?: Partial<MountLimits>;
  /** How often expired mounts are swept (default 10 s). */
  sweepEveryMs?: number;
  now?: () => number;
}

export interface CreateMount {
  imageRef: string;
  agent: AgentRow;
  peerAddress: string;
  writable: boolean;
  ttlSeconds: number;
  requestedBy: MountRequester;
}

interface LiveExport {
  mountId: string;
  image: MountImage;
  overlayDir: string | null;
  opened: Promise<OpenedExport> | null;
  connections: number;
}

interface LiveMount {
  row: MountRow;
  images: MountImage[];
  ended: boolean;
  /** Aborted when the mount ends: the NBD server closes its open connections (nbd-export.ts `revoked`). */
  revoke: AbortController;
}

export class MountManager {
  readonly mounts: MountCatalog;
  private readonly live = new Map<string, LiveMount>();
  private readonly byExport = new Map<string, LiveExport>();
  private readonly limits: MountLimits;
  private readonly now: () => number;
  private timer: NodeJS.Timeout | null = null;
  /** Called after a mount ended (removed, expired): the protocol tells its agent. */
  onEnded: ((m: MountRow, reason: string) => void) | null = null;
  /** Mounts of the previous process that `start` ended, to tell their agents when they connect. */
  readonly endedAtStart: MountRow[] = [];

  constructor(private readonly o: MountManagerOptions) {
    this.mounts = new MountCatalog(o.catalog);
    this.limits = { perAgent: 16, total: 256, maxTtlSeconds: 366 * 86400, ...o.limits };
    this.now = o.now ?? Date.now;
  }

  get dir(): string {
    return join(this.o.dataDir, MOUNTS_DIR);
  }

  /**
   * Ends what a previous process left (DESIGN.md §6.2): every active mount,
   * every overlay directory of ours. Then sweeps expiry periodically.
   */
  async start(): Promise<{ ended: string[]; removedOverlays: string[] }> {
    const ended: string[] = [];
    for (const m of this.mounts.list()) {
      if (this.mounts.end(m.id, 'appliance restarted: the mount\'s NBD connections ended with the previous process')) {
        ended.push(m.id);
        this.endedAtStart.push(this.mounts.get(m.id)!);
      }
    }
    await makePrivateDir(this.dir);
    const removedOverlays: string[] = [];
    for (const name of await readdir(this.dir)) {
      if (!OVERLAY_RE.test(name)) {
        this.o.log.warn({ entry: join(this.dir, name) }, 'not a blocksnap overlay: left in place');
        continue;
      }
      await rm(join(this.dir, name), { recursive: true, force: true });
      removedOverlays.push(name);
    }
    if (ended.length || removedOverlays.length) this.o.log.info({ endedMounts: ended, removedOverlays }, 'ended the mounts of the previous process');
    const every = this.o.sweepEveryMs ?? 10_000;
    this.timer = setInterval(() => void this.sweep().catch((e) => this.o.log.error({ err: e }, 'mount expiry sweep failed')), every);
    this.timer.unref();
    return { ended, removedOverlays };
  }

  /** The images a reference names: an image id, or every member of an image set. Missing or damaged: refused. */
  imagesOf(ref: string): ImageRow[] {
    const one = this.o.catalog.image(ref);
    const images = one ? [one] : this.o.catalog.listImages().filter((i) => i.setId === ref);
    if (images.length === 0 || images.some((i) => !i.rootDigest)) throw new BlocksnapError('E_NOT_FOUND', `no image or image set ${ref}`);
    const damaged = images.filter((i) => i.damage.length > 0);
    if (damaged.length) {
      throw new BlocksnapError('E_STORE_CORRUPT', `image ${damaged[0]!.id} is damaged (${damaged[0]!.damage.map((d) => d.object).join(', ')}): it cannot be mounted`);
    }
    return images;
  }

  /**
   * A new mount of `imageRef` for `agent` at `peerAddress`: one export name
   * per volume; a writable mount gets an empty overlay per volume (O(1)).
   */
  async create(req: CreateMount): Promise<MountRow> {
    const images = this.imagesOf(req.imageRef);
    if (!Number.isInteger(req.ttlSeconds) || req.ttlSeconds < 0 || req.ttlSeconds > this.limits.maxTtlSeconds) {
      throw new BlocksnapError('E_USAGE', `ttl ${req.ttlSeconds} s is outside 0..${this.limits.maxTtlSeconds}`);
    }
    const active = [...this.live.values()].filter((m) => !m.ended);
    if (active.length >= this.limits.total) throw new BlocksnapError('E_BUSY', `${active.length} mounts are live (limit ${this.limits.total})`);
    if (active.filter((m) => m.row.agentId === req.agent.id).length >= this.limits.perAgent) {
      throw new BlocksnapError('E_BUSY', `agent ${req.agent.name} has ${this.limits.perAgent} live mounts (the limit): unmount one first`);
    }
    const id = `mnt-${this.now().toString(36)}-${randomBytes(6).toString('hex')}`;
    const members: MountImage[] = images.map((i) => ({
      imageId: i.id, volume: i.volume, rootDigest: Buffer.from(i.rootDigest, 'hex'), size: i.volumeSize, chunkSize: i.chunkSize,
      pg: (i.pg as PgImageInfo | null) ?? null,
    }));
    const exports = members.map((img, n) => ({
      volume: img.volume, imageId: img.imageId, exportName: randomBytes(EXPORT_NAME_BYTES).toString('hex'),
      overlay: req.writable ? overlayName(id, n) : null,
    }));
    const created: string[] = [];
    try {
      if (req.writable) {
        await makePrivateDir(this.dir);
        for (let n = 0; n < members.length; n++) {
          const dir = this.overlayDir(exports[n]!.overlay!);
          created.push(dir);
          await this.o.backend.createOverlay(dir, members[n]!);
        }
      }
      this.mounts.insert({
        id, imageRef: req.imageRef, agentId: req.agent.id, peerAddress: normalizeAddress(req.peerAddress), writable: req.writable,
        requestedBy: req.requestedBy, createdAt: new Date(this.now()).toISOString(),
        expiresAt: req.ttlSeconds > 0 ? new Date(this.now() + req.ttlSeconds * 1000).toISOString() : null, exports,
      });
    } catch (e) {
      for (const d of created) await rm(d, { recursive: true, force: true });
      throw toBlocksnapError(e, 'E_STORE_IO');
    }
    const row = this.mounts.get(id)!;
    this.live.set(id, { row, images: members, ended: false, revoke: new AbortController() });
    exports.forEach((x, n) => {
      this.byExport.set(x.exportName, { mountId: id, image: members[n]!, overlayDir: x.overlay ? this.overlayDir(x.overlay) : null, opened: null, connections: 0 });
    });
    this.o.log.info({ mount: id, image: req.imageRef, agent: req.agent.name, writable: req.writable, expiresAt: row.expiresAt, by: req.requestedBy }, 'mount created');
    return row;
  }

  /** The images of a live mount (for its grant and its WAL). */
  imagesOfMount(id: string): MountImage[] | undefined {
    const m = this.live.get(id);
    return m && !m.ended ? m.images : undefined;
  }

  /**
   * The NBD server's resolver: a live, unexpired mount's export, to the
   * address it was handed to; anything else is "no such export" (the
   * server answers ERR_UNKNOWN and tells the client nothing more).
   */
  readonly resolve: NbdExportResolver = async (name: string, peer: NbdPeer) => {
    const x = this.byExport.get(name);
    const m = x && this.live.get(x.mountId);
    if (!x || !m || m.ended) return undefined;
    if (normalizeAddress(peer.address) !== m.row.peerAddress) {
      this.o.log.warn({ mount: m.row.id, peer: peer.address }, 'NBD export asked for from another address: refused');
      return undefined;
    }
    if (this.expired(m.row)) {
      void this.remove(m.row.id, 'expired').catch(() => undefined);
      return undefined;
    }
    x.opened ??= this.o.backend.open(x.image, x.overlayDir);
    let opened: OpenedExport;
    try {
      opened = await x.opened;
    } catch (e) {
      x.opened = null;
      this.o.log.error({ mount: m.row.id, err: e }, 'cannot open the export of a mount');
      return undefined;
    }
    if (m.ended) return undefined;
    x.connections++;
    return guarded(opened.export, () => m.ended, () => {
      x.connections--;
    }, m.revoke.signal);
  };

  /** NBD connections open to a mount's exports. */
  connectionsOf(id: string): number {
    let n = 0;
    for (const x of this.byExport.values()) if (x.mountId === id) n += x.connections;
    return n;
  }

  /**
   * Ends a mount: its open NBD connections are closed (a request racing the
   * removal fails), its exports are closed and its overlays deleted.
   */
  async remove(id: string, reason: string): Promise<MountRow> {
    if (!MOUNT_ID_RE.test(id)) throw new BlocksnapError('E_NOT_FOUND', `no mount ${JSON.stringify(id.slice(0, 80))}`);
    const row = this.mounts.get(id);
    if (!row) throw new BlocksnapError('E_NOT_FOUND', `no mount ${id}`);
    const m = this.live.get(id);
    if (m) m.ended = true;
    m?.revoke.abort(); // its open NBD connections end now, before the overlay goes
    const wasActive = this.mounts.end(id, reason);
    for (const [name, x] of this.byExport) {
      if (x.mountId !== id) continue;
      this.byExport.delete(name);
      const opened = await x.opened?.catch(() => null);
      await opened?.close().catch((e) => this.o.log.warn({ mount: id, err: e }, 'closing a mount export failed'));
    }
    for (const x of row.exports) if (x.overlay && OVERLAY_RE.test(x.overlay)) await rm(this.overlayDir(x.overlay), { recursive: true, force: true });
    this.live.delete(id);
    const ended = this.mounts.get(id)!;
    if (wasActive) {
      this.o.log.info({ mount: id, reason }, 'mount ended');
      this.onEnded?.(ended, reason);
    }
    return ended;
  }

  /** Ends every expired mount; returns their ids. */
  async sweep(): Promise<string[]> {
    const out: string[] = [];
    for (const m of [...this.live.values()]) {
      if (!m.ended && this.expired(m.row)) {
        await this.remove(m.row.id, 'expired');
        out.push(m.row.id);
      }
    }
    return out;
  }

  /** True while a live mount exports the image (retention must not delete it). */
  isMounted(imageId: string): boolean {
    return this.mounts.activeMountsOf(imageId).length > 0;
  }

  /**
   * Appliance stop: exports closed, rows left active. The next start ends
   * them (and removes their overlays) like after a crash, so the agents that
   * connect to it are told (DESIGN.md §6.2).
   */
  async close(): Promise<void> {
    if (this.timer) clearInterval(this.timer);
    this.timer = null;
    for (const m of this.live.values()) m.ended = true;
    for (const x of this.byExport.values()) {
      const opened = await x.opened?.catch(() => null);
      await opened?.close().catch(() => undefined);
    }
    this.byExport.clear();
    this.live.clear();
  }

  private expired(row: MountRow): boolean {
    return row.expiresAt !== null && Date.parse(row.expiresAt) <= this.now();
  }

  private overlayDir(name: string): string {
    if (!OVERLAY_RE.test(name)) throw new BlocksnapError('E_INTERNAL', `not an overlay name: ${name}`);
    return join(this.dir, name);
  }
}

export function overlayName(mountId: string, member: number): string {
  return `${mountId}.${member}`;
}

/** An IPv4 peer may show as ::ffff:a.b.c.d on a dual-stack socket: one spelling per address. */
export function normalizeAddress(a: string): string {
  return a.startsWith('::ffff:') && a.includes('.') ? a.slice(7) : a;
}

/** The export as one connection sees it: every call refused once the mount ended; release counted once. */
function guarded(exp: NbdExport, ended: () => boolean, onRelease: () => void, revoked: AbortSignal): NbdExport {
  const check = () => {
    if (ended()) throw new BlocksnapError('E_NOT_FOUND', 'the mount was removed');
  };
  let released = false;
  const g: NbdExport = {
    size: exp.size,
    chunkSize: exp.chunkSize,
    readOnly: exp.readOnly,
    canMultiConn: exp.canMultiConn,
    revoked,
    read: async (o, l) => (check(), exp.read(o, l)),
    runs: async (o, l, n) => (check(), exp.runs(o, l, n)),
    release: () => {
      if (released) return;
      released = true;
      onRelease();
      exp.release?.();
    },
  };
  if (exp.write) g.write = async (o, d) => (check(), exp.write!(o, d));
  if (exp.zero) g.zero = async (o, l, opts) => (check(), exp.zero!(o, l, opts));
  if (exp.flush) g.flush = async () => (check(), exp.flush!());
  return g;
}
