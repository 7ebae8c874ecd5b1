/**
 * Garbage collection of the chunk store (DESIGN.md §12.2, §12.3): mark every
 * blob a live image needs, then sweep packs: a pack with no live blob is
 * deleted, a pack whose live bytes are below `rewriteBelow` of its size is
 * rewritten (live blobs copied into a new pack, index moved, old pack
 * removed). Runs while backups, exports and verifies run.
 *
 * Safety (the argument is in DESIGN.md §12.3), in code order:
 * 1. T0, one synchronous section: the store's GC window opens (every writer
 *    alive from now on keeps its dedup-hit filter consulted), the indexed and
 *    the pending packs are read (the only packs that may be swept are the ones
 *    indexed now and not pending), and the live images are listed. Then the
 *    blob index is scanned in batches into dense ids.
 * 2. Mark (async): every live image's root, pages (each distinct page loaded
 *    once) and chunks, its WAL pieces, and the basis of every running job.
 *    A root or page that cannot be read stops the GC before any sweep.
 * 3. Sweep, per pack: the decision and the index change happen in one
 *    synchronous section that first asks the window whether any writer may
 *    have de-duplicated against a blob about to go; if so the blob is live.
 *    Index rows go first (durably), the file after: a crash in between
 *    leaves an unindexed pack the next start indexes again (garbage).
 */
import { rm } from 'node:fs/promises';
import { dirname, join } from 'node:path';
import type { Logger } from 'pino';
import { BlocksnapError, toBlocksnapError } from '../../proto/errors.js';
import { fsyncDir } from '../../proto/shared/durable-file.js';
import { DIGEST_BYTES, decodeRoot } from '../../proto/shared/image-root.js';
import { ZERO_DIGEST } from '../store/chunk-store.js';
import type { FsChunkStore } from '../store/fs-chunk-store.js';
import { packRelPath, type TrailerEntry } from '../store/pack-format.js';
import { PackReader } from '../store/pack-reader.js';
import { PackWriter } from '../store/pack-writer.js';
import { BlobTable, MarkBits } from './blob-table.js';

export const DEFAULT_REWRITE_BELOW = 0.5;

export type GcStep = (name: string) => void | Promise<void>;

export interface LiveImage {
  imageId: string;
  agent: string;
  volume: string;
  rootHex: string;
  volumeSize: number;
  /** hex digests of the WAL pieces the image carries (manifest pg.wal). */
  walDigests: string[];
}

export interface GcOptions {
  store: FsChunkStore;
  /** Called inside the T0 section: the catalog's images and running jobs' bases (synchronous). */
  liveNow: () => LiveImage[];
  /** After T0: images known only by a manifest (no catalog row yet); marked too. */
  liveLater?: () => Promise<LiveImage[]>;
  dryRun?: boolean;
  rewriteBelow?: number;
  log?: Logger;
  /** Test hook: awaited after the mark and at every durable step of the sweep (kill -9 and race tests stop there). */
  step?: GcStep;
}

export interface VolumeUsage {
  agent: string;
  volume: string;
  images: number;
  /** Sum of the images' volume sizes (every image is a full map). */
  logicalBytes: number;
  /** Stored bytes of the distinct blobs this volume's images need. */
  referencedBytes: number;
}

export interface GcResult {
  dryRun: boolean;
  startedAt: string;
  images: number;
  /** Blobs and bytes in the index at T0. */
  blobs: number;
  liveBlobs: number;
  liveBytes: number;
  deadBlobs: number;
  deadBytes: number;
  /** Dead stored bytes still in packs after the sweep (kept packs above the threshold; = deadBytes for a dry run). */
  deadBytesAfter: number;
  /** Distinct index pages loaded by the mark. */
  pagesVisited: number;
  /** Blobs a live image needs that the index does not hold (already damaged images; verify names them). */
  missingChunks: number;
  packsBefore: number;
  bytesBefore: number;
  packsDeleted: number;
  packsRewritten: number;
  /** Packs left alone because a running job de-duplicated against a blob of them during the sweep. */
  packsKeptForIngest: number;
  /** Rewrites that failed before their index move (e.g. no space for the new pack): the old pack stays. */
  packsRewriteFailed: number;
  /** Pending packs (a running or unresolved job's) not considered. */
  packsPending: number;
  reclaimedBytes: number;
  /** What the sweep would reclaim (dry run) or could reclaim with a threshold of 100 %. */
  reclaimableBytes: number;
  bytesAfter: number;
  markSeconds: number;
  /** Of markSeconds: reading the blob index into the table (grows with blobs; the rest grows with distinct pages). */
  scanSeconds: number;
  sweepSeconds: number;
  volumes: VolumeUsage[];
}

interface PackPlan {
  pack: string;
  size: number;
  live: number[];
  dead: number[];
  liveBytes: number;
}

export async function collectGarbage(o: GcOptions): Promise<GcResult> {
  const { store } = o;
  const rewriteBelow = o.rewriteBelow ?? DEFAULT_REWRITE_BELOW;
  const startedAt = new Date().toISOString();
  const t0 = performance.now();
  // ---- T0: one synchronous section ----
  store.openGcWindow();
  try {
    const packSizes = store.index.packSizes();
    const pending = store.pendingPackSet();
    const live = o.liveNow();
    // The index scan may take batches (a million rows take seconds): the rows of the packs that can
    // be swept (indexed at T0, not pending) do not change until this GC changes them; rows of packs
    // indexed later are read or not, and such packs are never swept.
    const table = new BlobTable(store.stats().blobs + 16);
    for (let after = store.index.scanBlobs((d, p, len) => table.add(d, p, len)); after; after = store.index.scanBlobs((d, p, len) => table.add(d, p, len), after)) {
      await new Promise((r) => setImmediate(r));
    }
    table.seal();
    const scanSeconds = (performance.now() - t0) / 1000;
    // ---- mark ----
    const later = (await o.liveLater?.()) ?? [];
    const seen = new Set(live.map((l) => l.imageId));
    for (const l of later) if (!seen.has(l.imageId)) live.push(l);
    const mark = new MarkBits(table.count);
    const marker = new Marker(store, table, mark);
    const byVolume = new Map<string, { usage: VolumeUsage; ids: MarkBits; pages: MarkBits }>();
    const rootsDone = new Set<string>();
    for (const img of live) {
      const key = `${img.agent}\u0000${img.volume}`;
      let v = byVolume.get(key);
      if (!v) {
        v = { usage: { agent: img.agent, volume: img.volume, images: 0, logicalBytes: 0, referencedBytes: 0 }, ids: new MarkBits(table.count), pages: new MarkBits(table.count) };
        byVolume.set(key, v);
      }
      v.usage.images++;
      v.usage.logicalBytes += img.volumeSize;
      if (rootsDone.has(`${key}\u0000${img.rootHex}`)) continue;
      rootsDone.add(`${key}\u0000${img.rootHex}`);
      await marker.image(img, v.ids, v.pages);
    }
    for (const v of byVolume.values()) {
      let bytes = 0;
      for (const id of v.ids.ids()) bytes += table.storedLength(id);
      v.usage.referencedBytes = bytes;
    }
    const markSeconds = (performance.now() - t0) / 1000;
    await o.step?.('marked');
    // ---- plan ----
    const plans = new Map<string, PackPlan>();
    for (const [pack, size] of packSizes) plans.set(pack, { pack, size, live: [], dead: [], liveBytes: 0 });
    let liveBlobs = 0;
    let liveBytes = 0;
    let deadBytes = 0;
    for (let id = 0; id < table.count; id++) {
      const pack = table.packOf(id);
      const plan = plans.get(pack);
      if (!plan) continue; // a pack indexed after T0: never swept
      const len = table.storedLength(id);
      if (mark.has(id)) {
        plan.live.push(id);
        plan.liveBytes += len;
        liveBlobs++;
        liveBytes += len;
      } else {
        plan.dead.push(id);
        deadBytes += len;
      }
    }
    const res: GcResult = {
      dryRun: !!o.dryRun, startedAt, images: live.length, blobs: table.count, liveBlobs, liveBytes,
      deadBlobs: table.count - liveBlobs, deadBytes, deadBytesAfter: deadBytes, pagesVisited: marker.pagesVisited, missingChunks: marker.missingChunks,
      packsBefore: packSizes.size, bytesBefore: [...packSizes.values()].reduce((a, b) => a + b, 0),
      packsDeleted: 0, packsRewritten: 0, packsKeptForIngest: 0, packsRewriteFailed: 0, packsPending: 0, reclaimedBytes: 0, reclaimableBytes: 0,
      bytesAfter: 0, markSeconds, scanSeconds, sweepSeconds: 0,
      volumes: [...byVolume.values()].map((v) => v.usage).sort((a, b) => (a.agent + a.volume < b.agent + b.volume ? -1 : 1)),
    };
    // ---- sweep ----
    const t1 = performance.now();
    // Packs this sweep wrote (or found already there byte for byte, a rewrite a crash left behind):
    // they hold live rows now, whatever the T0 plan said about them.
    const written = new Set<string>();
    // Deletions first (they only free space), then rewrites, the emptiest packs first: on a full
    // disk the deletions make the room a rewrite needs for its new pack.
    const todo: PackPlan[] = [];
    for (const plan of plans.values()) {
      if (pending.has(plan.pack)) {
        res.packsPending++;
        continue;
      }
      if (plan.size > 0 && plan.liveBytes >= rewriteBelow * plan.size && plan.live.length > 0) continue;
      res.reclaimableBytes += plan.live.length === 0 ? plan.size : Math.max(0, plan.size - plan.liveBytes);
      todo.push(plan);
    }
    todo.sort((a, b) => a.liveBytes / Math.max(1, a.size) - b.liveBytes / Math.max(1, b.size));
    if (o.dryRun) {
      for (const plan of todo) {
        if (plan.live.length === 0) res.packsDeleted++;
        else res.packsRewritten++;
      }
    } else {
      const deletions = todo.filter((p) => p.live.length === 0);
      // Many packs per index transaction: one fsync for up to 64 packs, not one each.
      for (let i = 0; i < deletions.length; i += 64) {
        const batch = deletions.slice(i, i + 64);
        const gone = await deletePacks(store, table, batch, o.step);
        for (const plan of batch) {
          if (!gone.has(plan.pack)) {
            res.packsKeptForIngest++;
            continue;
          }
          res.reclaimedBytes += plan.size;
          for (const id of plan.dead) res.deadBytesAfter -= table.storedLength(id);
          res.packsDeleted++;
        }
      }
      for (const plan of todo) {
        if (plan.live.length === 0 || written.has(plan.pack)) continue;
        let r: number | 'kept';
        try {
          r = await rewritePack(store, table, plan, written, o.step);
        } catch (e) {
          const err = toBlocksnapError(e, 'E_STORE_IO');
          // A rewrite that fails before its index move changed nothing (a full disk, a pack unreadable):
          // the old pack stays whole; the next GC tries again. A bug stops the GC.
          if (err.code === 'E_INTERNAL') throw err;
          res.packsRewriteFailed++;
          o.log?.warn({ pack: plan.pack, err: err.message }, 'could not rewrite a pack; it stays as it is');
          continue;
        }
        if (r === 'kept') {
          res.packsKeptForIngest++;
          continue;
        }
        res.reclaimedBytes += r;
        for (const id of plan.dead) res.deadBytesAfter -= table.storedLength(id);
        res.packsRewritten++;
      }
    }
    res.sweepSeconds = (performance.now() - t1) / 1000;
    res.bytesAfter = store.stats().bytes;
    o.log?.info({ ...res, volumes: undefined }, o.dryRun ? 'garbage collection (dry run)' : 'garbage collection done');
    return res;
  } finally {
    store.closeGcWindow();
  }
}

/** Walks images' maps into the mark set; each distinct page is loaded once per volume. */
class Marker {
  pagesVisited = 0;
  missingChunks = 0;
  private readonly pagesSeen: MarkBits;

  constructor(
    private readonly store: FsChunkStore,
    private readonly table: BlobTable,
    private readonly mark: MarkBits,
  ) {
    this.pagesSeen = new MarkBits(table.count);
  }

  private markId(id: number, vol: MarkBits): void {
    this.mark.set(id);
    vol.set(id);
  }

  async image(img: LiveImage, vol: MarkBits, volPages: MarkBits): Promise<void> {
    const rootDigest = Buffer.from(img.rootHex, 'hex');
    const rootId = this.table.idOf(rootDigest);
    if (rootId >= 0) this.markId(rootId, vol);
    for (const w of img.walDigests) {
      const d = Buffer.from(w, 'hex');
      if (d.equals(ZERO_DIGEST)) continue;
      const id = this.table.idOf(d);
      if (id >= 0) this.markId(id, vol);
    }
    const root = decodeRoot(await this.read(rootDigest, `root of image ${img.imageId}`));
    for (let p = 0; p < root.pageCount; p++) {
      const off = p * DIGEST_BYTES;
      if (root.pages.compare(ZERO_DIGEST, 0, DIGEST_BYTES, off, off + DIGEST_BYTES) === 0) continue;
      const pageDigest = root.pages.subarray(off, off + DIGEST_BYTES);
      const pid = this.table.idOf(pageDigest);
      if (pid >= 0) {
        // Shared pages: the chunks of a page are marked once (per volume, for its accounting).
        if (volPages.has(pid)) continue;
        volPages.set(pid);
        this.markId(pid, vol);
      }
      const page = await this.read(Buffer.from(pageDigest), `page ${p} of image ${img.imageId}`);
      if (pid < 0 || !this.pagesSeen.has(pid)) this.pagesVisited++;
      if (pid >= 0) this.pagesSeen.set(pid);
      for (let s = 0; s < page.length; s += DIGEST_BYTES) {
        if (page.compare(ZERO_DIGEST, 0, DIGEST_BYTES, s, s + DIGEST_BYTES) === 0) continue;
        const id = this.table.idOf(page, s);
        if (id >= 0) this.markId(id, vol);
        // Not in the T0 index: a blob of a pack written after T0 (never swept) or one already lost.
        else if (!this.store.has(page.subarray(s, s + DIGEST_BYTES))) this.missingChunks++;
      }
    }
  }

  /** A root or page that cannot be read: the map is unknown, so nothing may be swept. */
  private async read(digest: Buffer, what: string): Promise<Buffer> {
    try {
      return await this.store.get(digest);
    } catch (e) {
      const err = toBlocksnapError(e, 'E_STORE_IO');
      throw new BlocksnapError(err.code === 'E_NOT_FOUND' ? 'E_STORE_CORRUPT' : err.code,
        `garbage collection stopped before sweeping: cannot read the ${what} (${err.message}); verify the images, then run gc again`, { cause: e });
    }
  }
}

/** Asks the store's GC window, in the caller's synchronous section: may a running writer reference one of these? */
function anyHit(store: FsChunkStore, table: BlobTable, ids: readonly number[]): boolean {
  for (const id of ids) if (store.maybeHit(Buffer.from(table.digest(id)))) return true;
  return false;
}

async function removeFile(store: FsChunkStore, pack: string, step?: GcStep): Promise<void> {
  const path = join(store.packsDir, packRelPath(pack));
  await store.forgetPack(pack);
  await rm(path, { force: true });
  await fsyncDir(dirname(path)).catch(() => undefined);
  await step?.('pack-file-removed');
}

/**
 * Deletes packs with no live blob, in one index transaction; returns the packs
 * deleted (a pack a running writer may have de-duplicated against stays).
 */
async function deletePacks(store: FsChunkStore, table: BlobTable, plans: PackPlan[], step?: GcStep): Promise<Set<string>> {
  // Synchronous: the check and the row removal see the same index (no put runs in between).
  const go = plans.filter((p) => !anyHit(store, table, p.dead));
  if (go.length === 0) return new Set();
  store.index.sweepPacks(go.map((p) => ({ pack: p.pack, dead: p.dead.map((id) => Buffer.from(table.digest(id))) })));
  store.sweepEpoch++;
  await step?.('pack-rows-removed');
  for (const p of go) await removeFile(store, p.pack, step);
  return new Set(go.map((p) => p.pack));
}

/** Copies a pack's live blobs (and any a running writer may have hit) into a new pack, moves the index, removes the old one. */
async function rewritePack(store: FsChunkStore, table: BlobTable, plan: PackPlan, written: Set<string>, step?: GcStep): Promise<number | 'kept'> {
  const keepIds = [...plan.live];
  let dead: number[] = [];
  for (const id of plan.dead) (store.maybeHit(Buffer.from(table.digest(id))) ? keepIds : dead).push(id);
  const keep = new Set(keepIds.map((id) => table.digest(id).toString('hex')));
  const reader = await PackReader.open(join(store.packsDir, packRelPath(plan.pack)), plan.pack);
  const writer = new PackWriter(store.tmpDir, store.packsDir, store.options.writeBufferSize);
  let entries: TrailerEntry[];
  let finished;
  try {
    entries = (await reader.entries()).filter((e) => keep.has(e.digest.toString('hex')));
    const copied = new Set<string>();
    for (const e of entries) {
      const hex = e.digest.toString('hex');
      if (copied.has(hex)) continue; // a blob appears once per pack (§3.1); be safe anyway
      copied.add(hex);
      await writer.append(e.digest, e.type, e.codec as 0 | 1, e.plainLength, await reader.readStored(e.offset, e.storedLength));
    }
    if (copied.size !== keep.size) {
      throw new BlocksnapError('E_STORE_CORRUPT', `pack ${plan.pack}: ${keep.size - copied.size} indexed blob(s) missing from its trailer`);
    }
    // The same live blobs in the same order make the same bytes, so the same pack id: a rewrite a
    // crash interrupted after its rename may already be there (then indexed as shadowed copies, and
    // planned for deletion at T0). Mark it before the rename so this sweep never deletes it.
    finished = await writer.finish((id) => written.add(id));
  } catch (e) {
    await writer.abort().catch(() => undefined);
    throw e;
  } finally {
    await reader.close();
  }
  await step?.('rewritten-pack-installed');
  // Synchronous from here to movePack: blobs hit while we copied are live too, and were not copied.
  dead = dead.filter((id) => !keep.has(table.digest(id).toString('hex')));
  if (anyHit(store, table, dead)) {
    // Rows not moved: the old pack stays whole until the next GC. The new file goes unless the index
    // already knows that pack (a crash's leftover, whose shadowed rows the next GC handles).
    if (!store.index.hasPack(finished.id)) await rm(finished.path, { force: true });
    return 'kept';
  }
  store.index.movePack(plan.pack, { id: finished.id, size: finished.size, entries: finished.entries }, dead.map((id) => Buffer.from(table.digest(id))));
  store.sweepEpoch++;
  await step?.('pack-rows-moved');
  await removeFile(store, plan.pack, step);
  return plan.size - finished.size;
}
