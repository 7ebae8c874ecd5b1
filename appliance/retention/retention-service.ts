/**
 * Retention in the appliance (DESIGN.md §12): delete, pin, prune by policy,
 * garbage collection and store usage, with the protections that make them
 * safe while jobs, mounts, exports and verifies run. The running appliance
 * owns one instance (Appliance.retention, reached through the control
 * socket); a stopped appliance's CLI makes one over the store it opened
 * under the data directory's lock (offline-retention.ts).
 *
 * Never removed: a pinned image, a mounted one (`isMounted`, the mount
 * manager's), the basis of a running job (`runningBases`), an image leased
 * by an export/verify/restore of this process (`leases`). An image set is
 * kept or removed whole: a member that must stay keeps every member.
 */
import { join } from 'node:path';
import { readFile } from 'node:fs/promises';
import type { Logger } from 'pino';
import { BlocksnapError } from '../../proto/errors.js';
import { writeFileDurably } from '../../proto/shared/durable-file.js';
import type { Catalog, ImageRow } from '../catalog/catalog.js';
import type { ChunkStore } from '../store/chunk-store.js';
import { FsChunkStore } from '../store/fs-chunk-store.js';
import type { ManifestStore } from '../store/manifest-store.js';
import type { PgImageInfo } from '../store/pg-image-info.js';
import { collectGarbage, DEFAULT_REWRITE_BELOW, type GcResult, type GcStep, type LiveImage, type VolumeUsage } from './gc.js';
import { ImageLeases } from './image-leases.js';
import { decidePrune, hasKeepOption, KEEP_KINDS, type KeepKind, type KeepOptions } from './prune-policy.js';
import { checkKeep, finishDeletions, RetentionCatalog, type PolicyRow } from './retention-catalog.js';

export interface RetentionDeps {
  catalog: Catalog;
  store: ChunkStore;
  manifests: ManifestStore;
  log: Logger;
  /** The mount manager's predicate (appliance/mounts/); default: nothing is mounted. */
  isMounted?: (imageId: string) => boolean;
  /** Images running jobs build on (their basis, or the basis they are about to take), with the job id. */
  runningBases?: () => { imageId: string; jobId: string }[];
  leases?: ImageLeases;
  /** Images other parts of the appliance are reading now (a restore stream to an agent), with what. */
  inUse?: () => { imageId: string; what: string }[];
  /** Test hook: awaited at every durable step of deletions and GC (kill -9 points, race tests). */
  step?: GcStep;
}

export interface PruneRequest {
  agent?: string;
  volume?: string;
  keep: KeepOptions;
  dryRun?: boolean;
}

export interface PruneImageLine {
  imageId: string;
  agent: string;
  volume: string;
  createdAt: string;
  setId: string | null;
  action: 'keep' | 'remove';
  /** Why it is kept: the option (keep-daily …), or a protection (pinned, mounted, basis of job …, set member kept). */
  reason: string;
}

export interface PruneResult {
  dryRun: boolean;
  images: PruneImageLine[];
  removed: string[];
}

/** The last GC's summary (store/gc-state.json, DESIGN.md §12.4). */
export interface GcState {
  format: 'blocksnap-gc-state';
  version: 1;
  result: GcResult;
}

export interface StoreUsage {
  physicalBytes: number;
  packs: number;
  blobs: number;
  images: number;
  logicalBytes: number;
  /** logical / physical (0 when nothing is stored). */
  dedupRatio: number;
  /** From the last mark: dead stored bytes left after that GC (what one at a 100 % threshold would still free), and when it ran. */
  reclaimableBytes: number | null;
  lastMarkAt: string | null;
  volumes: (VolumeUsage & { referencedBytesAt: string | null })[];
}

export class Retention {
  readonly rc: RetentionCatalog;
  readonly leases: ImageLeases;
  private queue: Promise<unknown> = Promise.resolve();

  constructor(readonly deps: RetentionDeps) {
    this.rc = new RetentionCatalog(deps.catalog);
    this.leases = deps.leases ?? new ImageLeases();
  }

  /** One GC or deletion at a time, in arrival order. */
  private exclusive<T>(fn: () => Promise<T>): Promise<T> {
    const run = this.queue.then(fn, fn);
    this.queue = run.catch(() => undefined);
    return run;
  }

  /** Why `id` may not be removed now, or null. */
  protectionOf(id: string, pinned = this.rc.pinned()): string | null {
    if (pinned.has(id)) return 'pinned';
    if (this.deps.isMounted?.(id)) return 'mounted';
    const job = this.deps.runningBases?.().find((b) => b.imageId === id);
    if (job) return `basis of running job ${job.jobId}`;
    const lease = this.leases.purposeOf(id) ?? this.deps.inUse?.().find((u) => u.imageId === id)?.what;
    if (lease) return `in use (${lease})`;
    return null;
  }

  private image(id: string): ImageRow {
    return imageOf(this.deps.catalog, id);
  }

  private withSet(img: ImageRow, all: ImageRow[]): ImageRow[] {
    return withSet(img, all);
  }

  pin(id: string): ImageRow[] {
    return pinImage(this.deps.catalog, id, true);
  }

  unpin(id: string): ImageRow[] {
    return pinImage(this.deps.catalog, id, false);
  }

  /** `images delete`: the image (with its whole set); refused (E_BUSY) while protected. */
  deleteImage(id: string, opts: { dryRun?: boolean } = {}): Promise<{ dryRun: boolean; removed: string[] }> {
    return this.exclusive(async () => {
      const members = this.withSet(this.image(id), this.deps.catalog.listImages());
      const pinned = this.rc.pinned();
      for (const m of members) {
        const why = this.protectionOf(m.id, pinned);
        if (why) {
          throw new BlocksnapError('E_BUSY', `image ${m.id}${m.id === id ? '' : ` (member of set ${m.setId} with ${id})`} is ${why}: not deleted${why === 'pinned' ? ' (images unpin first)' : ''}`);
        }
      }
      const ids = members.map((m) => m.id);
      if (!opts.dryRun) await this.remove(ids);
      return { dryRun: !!opts.dryRun, removed: ids };
    });
  }

  /** Tombstone + rows (one transaction), then manifests, then tombstones (DESIGN.md §12.1). */
  private async remove(ids: string[]): Promise<void> {
    if (ids.length === 0) return;
    this.rc.tombstone(ids);
    await this.deps.step?.('tombstoned');
    this.deps.log.info({ images: ids }, 'images deleted from the catalog; removing their manifests');
    await finishDeletions(this.deps.catalog, this.deps.manifests, this.deps.step);
  }

  /** `prune`: per volume, PBS semantics; sets whole; protections first. */
  prune(req: PruneRequest): Promise<PruneResult> {
    checkKeep(req.keep);
    if (!hasKeepOption(req.keep)) throw new BlocksnapError('E_USAGE', 'prune needs at least one --keep-… option above 0');
    return this.exclusive(async () => {
      const all = this.deps.catalog.listImages().filter((i) => i.kind !== 'unknown');
      const scope = all.filter((i) => (!req.agent || i.agent === req.agent) && (!req.volume || i.volume === req.volume));
      const lines = planPrune(scope, all, () => req.keep, (id, pinned) => this.protectionOf(id, pinned), this.rc.pinned());
      const removed = lines.filter((l) => l.action === 'remove').map((l) => l.imageId);
      if (!req.dryRun) await this.remove(removed);
      if (removed.length) this.deps.log.info({ removed: removed.length, dryRun: !!req.dryRun, agent: req.agent, volume: req.volume }, 'prune');
      return { dryRun: !!req.dryRun, images: lines, removed };
    });
  }

  setPolicy(agent: string, volume: string, keep: KeepOptions): PolicyRow {
    return setPolicy(this.deps.catalog, agent, volume, keep);
  }

  /**
   * After a successful backup: the policies of its volumes are applied (each
   * volume's own policy, one prune per volume), then a GC if anything went.
   * Never throws: a failure is logged, the backup stands.
   */
  async afterBackup(agent: string, volumes: readonly string[]): Promise<{ pruned: string[]; gc: GcResult | null }> {
    const pruned: string[] = [];
    try {
      for (const v of volumes) {
        const p = this.rc.policy(agent, v);
        if (!p) continue;
        const r = await this.prune({ agent, volume: v, keep: p.keep });
        pruned.push(...r.removed);
      }
      const gc = pruned.length ? await this.gc({}) : null;
      return { pruned, gc };
    } catch (e) {
      this.deps.log.warn({ err: e, agent, volumes }, 'retention after backup failed; the backup stands');
      return { pruned, gc: null };
    }
  }

  /** `gc`: mark and sweep (gc.ts); the summary is kept for `store usage`. */
  gc(opts: { dryRun?: boolean; rewriteBelow?: number }): Promise<GcResult> {
    const store = this.deps.store;
    if (!(store instanceof FsChunkStore)) throw new BlocksnapError('E_USAGE', 'this chunk store backend has no garbage collection');
    return this.exclusive(async () => {
      await finishDeletions(this.deps.catalog, this.deps.manifests, this.deps.step);
      const result = await collectGarbage({
        store, dryRun: opts.dryRun, rewriteBelow: opts.rewriteBelow ?? DEFAULT_REWRITE_BELOW, log: this.deps.log, step: this.deps.step,
        liveNow: () => this.liveNow(),
        liveLater: () => this.liveFromManifests(),
      });
      const state: GcState = { format: 'blocksnap-gc-state', version: 1, result };
      await writeFileDurably(gcStatePath(store), JSON.stringify(state) + '\n');
      await this.deps.step?.('gc-state-written');
      return result;
    });
  }

  /** Catalog images and the bases of running jobs (synchronous: runs inside the GC's T0 section). */
  private liveNow(): LiveImage[] {
    const out: LiveImage[] = [];
    const ids = new Set<string>();
    for (const i of this.deps.catalog.listImages()) {
      if (i.kind === 'unknown' || !i.rootDigest) continue;
      ids.add(i.id);
      out.push(liveOf(i.id, i.agent, i.volume, i.rootDigest, i.volumeSize, i.pg as PgImageInfo | null));
    }
    // A running job's basis is a catalog image (deleting it is refused); listed again in case that ever changes.
    for (const b of this.deps.runningBases?.() ?? []) {
      if (ids.has(b.imageId)) continue;
      const i = this.deps.catalog.image(b.imageId);
      if (i && i.rootDigest) out.push(liveOf(i.id, i.agent, i.volume, i.rootDigest, i.volumeSize, i.pg as PgImageInfo | null));
    }
    return out;
  }

  /** Manifests without a catalog row (a commit between its rename and its row, or one not rolled forward): live too. */
  private async liveFromManifests(): Promise<LiveImage[]> {
    const have = this.deps.catalog.imageIds();
    const out: LiveImage[] = [];
    for (const id of await this.deps.manifests.list()) {
      if (have.has(id)) continue;
      const m = await this.deps.manifests.get(id).catch((e) => {
        throw new BlocksnapError('E_STORE_CORRUPT', `garbage collection stopped before sweeping: manifest ${id} has no catalog row and cannot be read (${(e as Error).message}); restart the appliance (it quarantines it) and run gc again`, { cause: e });
      });
      out.push(liveOf(m.imageId, m.agent, m.volume, m.rootDigest, m.volumeSize, m.pg ?? null));
    }
    return out;
  }

  async usage(): Promise<StoreUsage> {
    const st = this.deps.store.stats();
    const imgs = this.deps.catalog.listImages().filter((i) => i.kind !== 'unknown');
    const logical = imgs.reduce((s, i) => s + i.volumeSize, 0);
    const state = this.deps.store instanceof FsChunkStore ? await readGcState(this.deps.store) : null;
    const last = state?.result;
    const vols = new Map<string, StoreUsage['volumes'][number]>();
    for (const i of imgs) {
      const k = `${i.agent}\u0000${i.volume}`;
      let v = vols.get(k);
      if (!v) {
        const marked = last?.volumes.find((x) => x.agent === i.agent && x.volume === i.volume);
        vols.set(k, (v = { agent: i.agent, volume: i.volume, images: 0, logicalBytes: 0, referencedBytes: marked?.referencedBytes ?? 0, referencedBytesAt: marked ? last!.startedAt : null }));
      }
      v.images++;
      v.logicalBytes += i.volumeSize;
    }
    return {
      physicalBytes: st.bytes, packs: st.packs, blobs: st.blobs, images: imgs.length, logicalBytes: logical,
      dedupRatio: st.bytes > 0 ? logical / st.bytes : 0,
      reclaimableBytes: last ? (last.deadBytesAfter ?? last.deadBytes) : null, lastMarkAt: last?.startedAt ?? null,
      volumes: [...vols.values()].sort((a, b) => (a.agent + a.volume < b.agent + b.volume ? -1 : 1)),
    };
  }
}

function imageOf(catalog: Catalog, id: string): ImageRow {
  const img = catalog.image(id);
  if (!img || img.kind === 'unknown') throw new BlocksnapError('E_NOT_FOUND', `no image ${id}`);
  return img;
}

/** The image and, for a set member, every member of its set. */
function withSet(img: ImageRow, all: ImageRow[]): ImageRow[] {
  return img.setId ? all.filter((i) => i.setId === img.setId) : [img];
}

/** `images pin|unpin`: a catalog row per member of the image's set (no store needed: the CLI does it directly). */
export function pinImage(catalog: Catalog, id: string, pin: boolean): ImageRow[] {
  const rc = new RetentionCatalog(catalog);
  const members = withSet(imageOf(catalog, id), catalog.listImages());
  for (const m of members) {
    if (pin) rc.pin(m.id);
    else rc.unpin(m.id);
  }
  return members;
}

/** `policies set`: checked, then stored. */
export function setPolicy(catalog: Catalog, agent: string, volume: string, keep: KeepOptions): PolicyRow {
  checkKeep(keep);
  if (!hasKeepOption(keep)) throw new BlocksnapError('E_USAGE', 'a policy needs at least one --keep-… option above 0 (policies remove deletes one)');
  return new RetentionCatalog(catalog).setPolicy(agent, volume, keep);
}

/**
 * The prune decision over `scope` (a volume's images decided by its own
 * `keepOf`), then sets and protections: an image that must stay keeps its
 * whole set, and a set leaves only when every member is to leave.
 */
export function planPrune(
  scope: ImageRow[], all: ImageRow[], keepOf: (agent: string, volume: string) => KeepOptions,
  protection: (id: string, pinned: Set<string>) => string | null, pinned: Set<string>,
): PruneImageLine[] {
  const lines = new Map<string, PruneImageLine>();
  const byVolume = new Map<string, ImageRow[]>();
  for (const i of scope) {
    const k = `${i.agent}\u0000${i.volume}`;
    byVolume.set(k, [...(byVolume.get(k) ?? []), i]);
  }
  for (const imgs of byVolume.values()) {
    const d = decidePrune(imgs, keepOf(imgs[0]!.agent, imgs[0]!.volume));
    for (const i of imgs) {
      const kept: KeepKind | undefined = d.keep.get(i.id);
      lines.set(i.id, {
        imageId: i.id, agent: i.agent, volume: i.volume, createdAt: i.createdAt, setId: i.setId,
        action: kept ? 'keep' : 'remove', reason: kept ? `keep-${kept}` : '',
      });
    }
  }
  for (const l of lines.values()) {
    if (l.action !== 'remove') continue;
    const why = protection(l.imageId, pinned);
    if (why) Object.assign(l, { action: 'keep', reason: why });
  }
  // Sets: one kept member (in or out of scope) keeps them all; members out of scope leave with the set.
  const sets = new Map<string, ImageRow[]>();
  for (const i of all) if (i.setId) sets.set(i.setId, [...(sets.get(i.setId) ?? []), i]);
  for (const [setId, members] of sets) {
    const inScope = members.filter((m) => lines.has(m.id));
    if (inScope.length === 0) continue;
    // Out-of-scope members (other volumes of the group) have no decision of their own: they stay
    // only if protected; otherwise the in-scope members decide for the whole set.
    const stays = members.some((m) => {
      const l = lines.get(m.id);
      return l ? l.action === 'keep' : protection(m.id, pinned) !== null;
    });
    for (const m of members) {
      let l = lines.get(m.id);
      if (!l) {
        l = { imageId: m.id, agent: m.agent, volume: m.volume, createdAt: m.createdAt, setId, action: 'remove', reason: '' };
        lines.set(m.id, l);
      }
      if (stays && l.action === 'remove') Object.assign(l, { action: 'keep', reason: `member of set ${setId}, which is kept` });
    }
  }
  return [...lines.values()].sort((a, b) => (a.createdAt === b.createdAt ? (a.imageId < b.imageId ? -1 : 1) : a.createdAt < b.createdAt ? -1 : 1));
}

function liveOf(imageId: string, agent: string, volume: string, rootHex: string, volumeSize: number, pg: PgImageInfo | null): LiveImage {
  const wal: string[] = [];
  for (const f of pg?.wal ?? []) for (const p of f.pieces) wal.push(p.digest);
  return { imageId, agent, volume, rootHex, volumeSize, walDigests: wal };
}

export function gcStatePath(store: FsChunkStore): string {
  return join(store.dir, 'gc-state.json');
}

async function readGcState(store: FsChunkStore): Promise<GcState | null> {
  try {
    const s = JSON.parse(await readFile(gcStatePath(store), 'utf8')) as GcState;
    return s.format === 'blocksnap-gc-state' && s.version === 1 ? s : null;
  } catch {
    return null;
  }
}

export { KEEP_KINDS };
