/**
 * ChunkStore on a local directory (the `store/` of DESIGN.md §2): packs under
 * packs/HH/, temp packs under tmp/, the blob index in index.sqlite.
 *
 * Opening the store empties tmp/ (half-written packs and manifests of a dead
 * process), forgets indexed packs whose file is gone, and indexes every pack
 * that is in packs/ but not in the index (a crash between rename and index
 * insert, §5). A pack whose footer or trailer is unreadable is quarantined
 * (DATA/quarantine/, §2) and reported in `recovery`; the store opens anyway.
 *
 * Packs no committed image is known to use are "pending" (§5): each writer
 * journals the packs it makes (before they appear under packs/) and the
 * packs of other writers it de-duplicates against, and the roots it stores.
 * `abort()` removes a writer's packs that no other writer depends on;
 * `resolvePending()` at start removes those of writers that never committed.
 */
import { randomUUID } from 'node:crypto';
import { chmodSync, statSync } from 'node:fs';
import { chmod, readdir, rm } from 'node:fs/promises';
import { dirname, join } from 'node:path';
import { BlocksnapError } from '../../proto/errors.js';
import type { Logger } from '../../proto/shared/log.js';
import { fsyncDir, makePrivateDir, PRIVATE_DIR_MODE, PRIVATE_FILE_MODE } from '../../proto/shared/durable-file.js';
import { BlobIndex, indexPacksFromFiles, type SkippedPack } from './blob-index.js';
import { ZERO_DIGEST, type BlobLocation, type BlobType, type BlobWriter, type ChunkStore, type PutResult } from './chunk-store.js';
import { CODEC_NONE, CODEC_ZSTD, packRelPath, type Codec } from './pack-format.js';
import { listPackFiles, PackReader, PackReaderCache } from './pack-reader.js';
import { BlobReadPool } from './blob-read-pool.js';
import { readBlobRuns } from './blob-runs.js';
import { quarantineFile, type QuarantineRecord } from './quarantine.js';
import { DEFAULT_WRITE_BUFFER, PackWriter } from './pack-writer.js';
import { DEFAULT_ZSTD_LEVEL, zstdCompress, zstdDeclaredSize } from '../../proto/shared/zstd.js';
import { HitFilter } from '../retention/hit-filter.js';

export const DEFAULT_TARGET_PACK_SIZE = 32 * 1024 * 1024;
export const DEFAULT_READ_HANDLES = 32;

export interface FsChunkStoreOptions {
  /** A writer starts a new pack when the next blob would exceed this (bytes). */
  targetPackSize?: number;
  /** Open pack files kept for reads (LRU). */
  readHandles?: number;
  /** Staging buffer of a pack writer; payloads reach the file in writes of about this size. */
  writeBufferSize?: number;
  /** zstd level for blobs put without a compressed form (pages, roots). */
  compressionLevel?: number;
  logger?: Logger;
  /** The appliance data directory (quarantine lives there); default: the store's parent. */
  dataDir?: string;
  /**
   * Worker threads of `getMany` (started at its first use). Default 0: it
   * reads like `get`, on the main thread — on this 2-core shared host the
   * workers measured slower under load (README Benchmarks, NBD export).
   */
  readWorkers?: number;
}

/** What opening the store found and repaired (DESIGN.md §6). */
export interface StoreRecovery {
  /** Packs moved to the quarantine (unreadable footer or trailer). */
  quarantined: QuarantineRecord[];
  /** Indexed packs whose file is gone (their rows were dropped). */
  missingPacks: string[];
  /** Digest (hex) → the lost object it was in, for naming damage. */
  lostBlobs: Map<string, string>;
}

/** What `resolvePending` / an abort removed. */
export interface PendingCleanup {
  removedPacks: string[];
  removedBytes: number;
  /** Packs that left the journal because a committed image uses them. */
  settledPacks: number;
}

export interface ResolvedStoreOptions {
  targetPackSize: number;
  writeBufferSize: number;
  compressionLevel: number;
}

export class FsChunkStore implements ChunkStore {
  readonly packsDir: string;
  readonly tmpDir: string;
  /** Writers holding digests in packs not yet indexed (they have temp files). */
  private readonly active = new Set<FsBlobWriter>();
  private readonly readers: PackReaderCache;
  private readPool: BlobReadPool | undefined;
  private readonly readWorkers: number;
  private closed = false;
  /** Pending packs of this process's writers → ids of the writers that made or depend on them. */
  private readonly pendingOwners = new Map<string, Set<string>>();
  /** Digests and size of each pending pack (to drop its rows without a scan). */
  private readonly pendingPacks = new Map<string, { digests: Buffer[]; size: number }>();
  /** Writers with pending packs, pins or roots not yet settled. */
  private readonly tracked = new Set<FsBlobWriter>();
  private committedRoot: ((rootHex: string) => boolean) | undefined;
  // ---- GC hooks (DESIGN.md §12.3; the GC itself is appliance/retention/gc.ts) ----
  /** Writers whose image is not known committed yet: each records its dedup hits. */
  private readonly liveWriters = new Set<FsBlobWriter>();
  /** While a GC runs: every writer alive since its mark began (the sweep keeps what they hit). */
  private gcWindow: Set<FsBlobWriter> | null = null;
  /** Bumped by every sweep that removed index rows: an ingest that saw it change re-checks its map (Ingest.finish). */
  sweepEpoch = 0;
  recovery: StoreRecovery = { quarantined: [], missingPacks: [], lostBlobs: new Map() };

  private constructor(
    readonly dir: string,
    readonly index: BlobIndex,
    readonly options: ResolvedStoreOptions,
    readHandles: number,
    readonly dataDir: string,
    readonly log: Logger | undefined,
    readWorkers = 0,
  ) {
    this.readWorkers = readWorkers;
    this.packsDir = join(dir, 'packs');
    this.tmpDir = join(dir, 'tmp');
    this.readers = new PackReaderCache(this.packsDir, readHandles);
  }

  /** `dir` is the store directory (DATA/store); it is created if missing. */
  static async open(dir: string, opts: FsChunkStoreOptions = {}): Promise<FsChunkStore> {
    const options: ResolvedStoreOptions = {
      targetPackSize: opts.targetPackSize ?? DEFAULT_TARGET_PACK_SIZE,
      writeBufferSize: opts.writeBufferSize ?? DEFAULT_WRITE_BUFFER,
      compressionLevel: opts.compressionLevel ?? DEFAULT_ZSTD_LEVEL,
    };
    if (!(options.targetPackSize > 0) || !(options.writeBufferSize > 0)) {
      throw new BlocksnapError('E_CONFIG', 'targetPackSize and writeBufferSize must be positive');
    }
    const packsDir = join(dir, 'packs');
    const tmpDir = join(dir, 'tmp');
    const dataDir = opts.dataDir ?? dirname(dir);
    try {
      await makePrivateDir(dir);
      await makePrivateDir(packsDir);
      await makePrivateDir(tmpDir);
      const leftovers = await readdir(tmpDir);
      await Promise.all(leftovers.map((name) => rm(join(tmpDir, name), { recursive: true, force: true })));
      if (leftovers.length > 0) opts.logger?.info({ tmpDir, removed: leftovers.length }, 'emptied store tmp');
    } catch (e) {
      throw new BlocksnapError('E_STORE_IO', `cannot prepare store ${dir}: ${(e as Error).message}`, { cause: e });
    }
    const indexFile = join(dir, 'index.sqlite');
    let index: BlobIndex;
    let indexRecord: QuarantineRecord | undefined;
    try {
      index = BlobIndex.open(indexFile);
    } catch (e) {
      if (!(e instanceof BlocksnapError) || e.code !== 'E_STORE_CORRUPT') throw e;
      // The index is a cache of the pack trailers: set the unreadable one aside and rebuild it
      // (reconcile indexes every pack it does not know). Its pending-pack journal is lost: garbage only.
      indexRecord = await quarantineFile(dataDir, indexFile, 'blob-index', 'blob index', e.message, [`${indexFile}-wal`, `${indexFile}-shm`]);
      opts.logger?.error({ reason: e.message, movedTo: indexRecord.to }, 'the blob index was unreadable: quarantined, rebuilding it from the packs');
      index = BlobIndex.open(indexFile);
    }
    const store = new FsChunkStore(dir, index, options, opts.readHandles ?? DEFAULT_READ_HANDLES, dataDir, opts.logger, opts.readWorkers);
    if (indexRecord) store.recovery.quarantined.push(indexRecord);
    try {
      await store.reconcile();
    } catch (e) {
      index.close();
      throw e;
    }
    return store;
  }

  /** Index ↔ files at open: rows of vanished packs go, unindexed packs come in, unreadable ones are quarantined. */
  private async reconcile(): Promise<void> {
    const listed = await listPackFiles(this.packsDir);
    const onDisk = new Map(listed.map((f) => [f.id, f.path]));
    for (const hh of new Set([...onDisk.values()].map((p) => dirname(p)))) await chmod(hh, PRIVATE_DIR_MODE);
    const pending = this.index.pendingPackIds();
    for (const [id, size] of this.index.packSizes()) {
      const path = onDisk.get(id);
      if (path !== undefined) {
        // One stat per pack (packs are immutable): a truncated or emptied pack cannot be read.
        // statSync: a start is alone on the loop, and an awaited stat per pack cost 0.2 ms (threadpool round trip).
        const st = statSync(path);
        // Packs of versions that wrote 0644 become private too (DESIGN.md §2).
        if ((st.mode & 0o777) !== PRIVATE_FILE_MODE) chmodSync(path, PRIVATE_FILE_MODE);
        const actual = st.size;
        if (actual === size) continue;
        const gone = this.index.removePack(id);
        const rec = await this.quarantinePack(id, path, new BlocksnapError('E_STORE_CORRUPT', `pack ${id}: file is ${actual} bytes, was ${size} when indexed`));
        for (const d of gone) this.recovery.lostBlobs.set(d.toString('hex'), `pack ${id} (quarantined to ${rec})`);
        continue;
      }
      const gone = this.index.removePack(id);
      this.recovery.missingPacks.push(id);
      for (const d of gone) this.recovery.lostBlobs.set(d.toString('hex'), `pack ${id} (file missing)`);
      // A pending pack may be one whose removal a crash interrupted (no loss) or one of a
      // committed image not yet settled: the image check at start tells.
      this.log?.[pending.has(id) ? 'warn' : 'error']({ pack: id, blobs: gone.length }, 'an indexed pack file is missing: its blobs are gone from the index');
    }
    // Packs quarantined above are not on disk any more.
    const moved = new Set(this.recovery.quarantined.map((q) => q.object.replace(/^pack /, '')));
    const files = listed.filter((f) => !moved.has(f.id));
    const found = await indexPacksFromFiles(this.index, this.packsDir, { all: false, files, onCorrupt: (id, path, e) => this.quarantinePack(id, path, e) });
    if (found.packs > 0) this.log?.warn({ packs: found.packs, blobs: found.blobs }, 'indexed packs missing from the blob index');
  }

  private async quarantinePack(id: string, path: string, e: BlocksnapError): Promise<string> {
    const rec = await quarantineFile(this.dataDir, path, 'pack', `pack ${id}`, e.message);
    this.recovery.quarantined.push(rec);
    this.log?.error({ pack: id, reason: e.message, movedTo: rec.to }, 'quarantined an unreadable pack');
    return rec.to;
  }

  openWriter(): BlobWriter {
    this.checkOpen();
    this.settleCommitted();
    const w = new FsBlobWriter(this, randomUUID());
    this.liveWriters.add(w);
    this.gcWindow?.add(w);
    return w;
  }

  /**
   * GC hook: from now until `closeGcWindow`, every writer alive now or opened
   * later stays consulted by `maybeHit`, even after it commits or aborts.
   * Synchronous, so no put falls between the start of a mark and this.
   */
  openGcWindow(): void {
    if (this.gcWindow) throw new BlocksnapError('E_BUSY', 'a garbage collection is already running on this store');
    this.settleCommitted(); // packs of committed jobs leave the journal now: pending packs are never swept
    this.gcWindow = new Set(this.liveWriters);
  }

  closeGcWindow(): void {
    this.gcWindow = null;
  }

  /** GC hook: false only if no writer of the window de-duplicated against `digest`. */
  maybeHit(digest: Buffer): boolean {
    for (const w of this.gcWindow ?? this.liveWriters) if (w.hits.mayHave(digest)) return true;
    return false;
  }

  /** GC hook: packs the pending-pack journal (§5.2) owns: never swept (abort and start-up decide them). */
  pendingPackSet(): Set<string> {
    const out = this.index.pendingPackIds();
    for (const p of this.pendingOwners.keys()) out.add(p);
    return out;
  }

  /** GC hook: a removed pack's open read handle is closed (an open fd would keep its disk space). */
  async forgetPack(pack: string): Promise<void> {
    await this.readers.forget(pack);
  }

  async get(digest: Buffer): Promise<Buffer> {
    this.checkOpen();
    const hex = digest.toString('hex');
    let loc = this.index.lookup(digest);
    if (!loc) throw new BlocksnapError('E_NOT_FOUND', `blob ${hex} not found`);
    try {
      try {
        return await this.readers.use(loc.pack, (r) => r.readBlob(digest, loc!));
      } catch (e) {
        // GC rewrote the pack under this read (its live blobs moved, then the old file went):
        // read the blob where the index says it is now.
        const now = this.index.lookup(digest);
        if (!now || now.pack === loc.pack) throw e;
        loc = now;
        return await this.readers.use(loc.pack, (r) => r.readBlob(digest, loc!));
      }
    } catch (e) {
      // Every failure names pack and blob, so an operator can find both.
      if (e instanceof BlocksnapError && !e.message.includes(hex)) {
        throw new BlocksnapError(e.code, `blob ${hex}: ${e.message}`, { cause: e });
      }
      throw e;
    }
  }

  /**
   * `get` of several blobs: those of one pack are read, decoded and re-hashed
   * together in a worker thread (adjacent frames with one pread), the plain
   * bytes transferred back as slices of one buffer. Anything that fails there
   * (a damaged blob, a pack GC rewrote under the read) is read again by
   * `get`, which retries a moved blob and names pack and digest in its error.
   */
  async getMany(digests: Buffer[]): Promise<Buffer[]> {
    this.checkOpen();
    if (this.readWorkers > 0) this.readPool ??= new BlobReadPool(this.readWorkers);
    const pool = this.readPool;
    // Without workers: one pread per run of adjacent frames on this thread (blob-runs.ts).
    if (!pool?.ready || pool.busy()) return readBlobRuns(this, digests);
    const out = new Array<Promise<Buffer>>(digests.length);
    const byPack = new Map<string, Array<{ k: number; loc: BlobLocation }>>();
    for (let k = 0; k < digests.length; k++) {
      const loc = this.index.lookup(digests[k]!);
      if (!loc) {
        out[k] = this.get(digests[k]!); // E_NOT_FOUND, worded as get() does
        continue;
      }
      let g = byPack.get(loc.pack);
      if (!g) byPack.set(loc.pack, (g = []));
      g.push({ k, loc });
    }
    for (const [pack, group] of byPack) {
      group.sort((a, b) => a.loc.offset - b.loc.offset);
      const done = this.readers.use(pack, async (r) => {
        const n = group.length;
        const task = {
          fd: r.fd,
          offset: new Float64Array(n),
          stored: new Uint32Array(n),
          plain: new Uint32Array(n),
          codec: new Uint8Array(n),
          digests: new Uint8Array(32 * n),
        };
        group.forEach(({ k, loc }, i) => {
          task.offset[i] = loc.offset;
          task.stored[i] = loc.storedLength;
          task.plain[i] = loc.plainLength;
          task.codec[i] = loc.codec;
          task.digests.set(digests[k]!, 32 * i);
        });
        return pool.run(task);
      });
      const slices = done.then((reply) => {
        const bad = new Set(reply.bad.map((b) => b.k));
        const res: Array<Buffer | undefined> = [];
        for (let i = 0, pos = 0; i < group.length; pos += group[i]!.loc.plainLength, i++) {
          res.push(bad.has(i) ? undefined : Buffer.from(reply.out, pos, group[i]!.loc.plainLength));
        }
        return res;
      }, () => group.map(() => undefined));
      group.forEach(({ k }, i) => {
        out[k] = slices.then((res) => res[i] ?? this.get(digests[k]!));
      });
    }
    return Promise.all(out);
  }

  /** `getMany`'s worker threads have started (before that it reads like `get`). */
  get readWorkersReady(): boolean {
    return this.readPool?.ready ?? false;
  }

  async readStoredv(pack: string, offset: number, buffers: Uint8Array[]): Promise<void> {
    this.checkOpen();
    await this.readers.use(pack, (r) => r.readStoredv(offset, buffers));
  }

  async getStored(digest: Buffer): Promise<{ codec: number; data: Buffer; plainLength: number }> {
    this.checkOpen();
    let loc = this.index.lookup(digest);
    if (!loc) throw new BlocksnapError('E_NOT_FOUND', `blob ${digest.toString('hex')} not found`);
    const read = (l: BlobLocation) => this.readers.use(l.pack, (r) => r.readStored(l.offset, l.storedLength));
    let data: Buffer;
    try {
      data = await read(loc);
    } catch (e) {
      // As in get(): GC may have moved the blob to a rewritten pack under this read.
      const now = this.index.lookup(digest);
      if (!now || now.pack === loc.pack) throw e;
      loc = now;
      data = await read(loc);
    }
    return { codec: loc.codec, data, plainLength: loc.plainLength };
  }

  has(digest: Buffer): boolean {
    this.checkOpen();
    return this.index.has(digest);
  }

  locate(digest: Buffer): BlobLocation | undefined {
    this.checkOpen();
    return this.index.lookup(digest);
  }

  stats(): { packs: number; blobs: number; bytes: number } {
    this.checkOpen();
    return this.index.stats();
  }

  /**
   * Rebuilds the blob index from the pack trailers alone (`store reindex`).
   * An unreadable pack is quarantined and reported in `skipped`; the rest is indexed.
   */
  async reindex(): Promise<{ packs: number; blobs: number; skipped: SkippedPack[] }> {
    this.checkOpen();
    if (this.active.size > 0) throw new BlocksnapError('E_BUSY', 'cannot reindex while blob writers are open');
    return indexPacksFromFiles(this.index, this.packsDir, { all: true, onCorrupt: (id, path, e) => this.quarantinePack(id, path, e) });
  }

  /**
   * Start-up clean-up of packs of jobs that never committed (DESIGN.md §5),
   * after the catalog was rolled forward: a journalled writer is committed
   * if a committed image has one of its roots; every pack a committed writer
   * made or depends on leaves the journal for good, every other journalled
   * pack is removed (rows, then file). `committedRoot` is kept to settle this
   * process's writers as their images commit.
   */
  async resolvePending(committedRoot: (rootHex: string) => boolean): Promise<PendingCleanup> {
    this.checkOpen();
    this.committedRoot = committedRoot;
    const out: PendingCleanup = { removedPacks: [], removedBytes: 0, settledPacks: 0 };
    const writers = this.index.pendingWriters();
    const keep = new Set<string>();
    const drop = new Set<string>();
    for (const w of writers.values()) {
      if (w.roots.some((r) => committedRoot(r.toString('hex')))) for (const p of w.packs) keep.add(p);
    }
    for (const w of writers.values()) for (const p of w.packs) if (!keep.has(p)) drop.add(p);
    for (const p of keep) this.index.settlePack(p);
    out.settledPacks = keep.size;
    for (const p of drop) {
      const path = join(this.packsDir, packRelPath(p));
      let digests: Buffer[] | undefined;
      let size = 0;
      try {
        const r = await PackReader.open(path, p);
        try {
          size = r.size;
          digests = (await r.entries()).map((e) => e.digest);
        } finally {
          await r.close();
        }
      } catch {
        digests = undefined; // gone or unreadable: drop its rows by a scan
      }
      await this.removePackFile(p, digests);
      out.removedPacks.push(p);
      out.removedBytes += size;
    }
    for (const id of writers.keys()) this.index.forgetWriter(id);
    if (out.removedPacks.length) this.log?.warn({ packs: out.removedPacks.length, bytes: out.removedBytes }, 'removed packs of jobs that never committed');
    return out;
  }

  /** Aborts writers still open (their unflushed blobs were never durable) and releases everything. */
  async close(): Promise<void> {
    if (this.closed) return;
    this.settleCommitted(); // keeps the journal short: committed writers leave it now
    this.closed = true;
    await Promise.allSettled([...this.active].map((w) => w.abort()));
    await this.readPool?.close();
    await this.readers.close();
    this.index.close();
  }

  /**
   * @internal A put found `digest` durable: if it is in another writer's pending
   * pack, `w` now depends on that pack (it must outlive that writer's abort).
   */
  dedupHit(digest: Buffer, w: FsBlobWriter): boolean {
    // No pending pack: nothing to pin, and the index's key-only lookup is the cheaper one (it is
    // per chunk: a full of an unchanged volume is all dedup hits).
    // Every hit is recorded in the writer's filter in the same tick as the lookup: a sweep
    // keeps what a live writer may have hit (DESIGN.md §12.3).
    if (this.pendingOwners.size === 0) {
      if (!this.index.has(digest)) return false;
      w.hits.add(digest);
      return true;
    }
    const pack = this.index.packOf(digest);
    if (pack === undefined) return false;
    w.hits.add(digest);
    this.pin(pack, w);
    return true;
  }

  /** @internal `w` depends on `pack` if that pack is pending and not already its own. */
  pin(pack: string, w: FsBlobWriter): void {
    const owners = this.pendingOwners.get(pack);
    if (!owners || owners.has(w.id)) return;
    owners.add(w.id);
    w.pins.add(pack);
    w.unsaved.push(pack);
    this.tracked.add(w);
  }

  /** @internal A writer's new pack, journalled before it is renamed into packs/ (sync: runs inside PackWriter.finish). */
  journalOwnPack(pack: string, w: FsBlobWriter): void {
    this.index.journal([{ pack, writer: w.id }], [], false); // synced by the pack's index insert that follows
    this.pendingOwners.set(pack, new Set([w.id]));
    w.pins.add(pack);
    this.tracked.add(w);
  }

  /** @internal The pack is durable and indexed; `winners` are packs the index reads some of its blobs from. */
  packIndexed(pack: string, size: number, digests: Buffer[], winners: Set<string>, w: FsBlobWriter): void {
    this.pendingPacks.set(pack, { digests, size });
    for (const other of winners) if (other !== pack) this.pin(other, w);
    // The index reads some of these blobs from an earlier pack (first copy wins): to a GC sweep
    // that is the same as a dedup hit of w on them (DESIGN.md §12.3). Rare: only then the lookups.
    if (winners.size > 0) for (const d of digests) if (this.index.packOf(d) !== pack) w.hits.add(d);
  }

  /** @internal Makes the pins and roots `w` gathered durable (before its flush resolves, so before any commit). */
  saveJournal(w: FsBlobWriter): void {
    const packs = w.unsaved.splice(0).map((pack) => ({ pack, writer: w.id }));
    const roots = w.unsavedRoots.splice(0).map((root) => ({ writer: w.id, root }));
    this.index.journal(packs, roots);
  }

  /**
   * @internal An aborted writer's packs: each one no other writer depends on is
   * removed (rows at once, so no new put can de-duplicate against it, then the
   * file). A writer that stored a root may have committed: it removes nothing
   * here and start-up decides (resolvePending) — unless the caller knows its
   * job never reached the commit point (`uncommitted`).
   */
  async dropWriter(w: FsBlobWriter, uncommitted = false): Promise<void> {
    if (w.roots.size > 0 && !uncommitted) return;
    this.liveWriters.delete(w); // no image of it will commit: its hits protect nothing (an open GC window keeps it anyway)
    const doomed: string[] = [];
    for (const pack of w.pins) {
      const owners = this.pendingOwners.get(pack);
      if (!owners) continue;
      owners.delete(w.id);
      if (owners.size === 0) doomed.push(pack);
    }
    this.tracked.delete(w);
    let bytes = 0;
    for (const pack of doomed) {
      this.pendingOwners.delete(pack);
      const info = this.pendingPacks.get(pack);
      this.pendingPacks.delete(pack);
      bytes += info?.size ?? 0;
      this.index.removePack(pack, info?.digests ?? []); // no info: it never reached the index
    }
    for (const pack of doomed) await this.removePackFile(pack, []);
    this.index.forgetWriter(w.id);
    if (doomed.length) this.log?.info({ packs: doomed.length, bytes }, 'removed the packs of an aborted blob writer');
  }

  /** Rows (unless `digests` is [] = already dropped), then the file, then the journal rows. */
  private async removePackFile(pack: string, digests: Buffer[] | undefined): Promise<void> {
    if (!digests || digests.length) this.index.removePack(pack, digests);
    const path = join(this.packsDir, packRelPath(pack));
    await rm(path, { force: true });
    await fsyncDir(dirname(path)).catch(() => undefined);
    this.index.settlePack(pack);
  }

  /** Writers whose image committed: their packs and the packs they depend on are permanent. */
  private settleCommitted(): void {
    if (!this.committedRoot) return;
    // A committed writer's image is in the catalog: a later mark sees it, its hit filter can go.
    for (const w of this.liveWriters) if ([...w.roots].some((r) => this.committedRoot!(r))) this.liveWriters.delete(w);
    for (const w of this.tracked) {
      if (![...w.roots].some((r) => this.committedRoot!(r))) continue;
      for (const pack of w.pins) {
        this.pendingOwners.delete(pack);
        this.pendingPacks.delete(pack);
        this.index.settlePack(pack);
      }
      this.index.forgetWriter(w.id);
      this.tracked.delete(w);
    }
  }

  /** @internal true if another open writer holds `key` in a pack not yet indexed. */
  pendingElsewhere(key: string, me: FsBlobWriter): boolean {
    for (const w of this.active) if (w !== me && w.holds(key)) return true;
    return false;
  }

  /** @internal a writer is active from its first pending digest until none is left. */
  activate(w: FsBlobWriter): void {
    this.active.add(w);
  }

  /** @internal */
  release(w: FsBlobWriter): void {
    this.active.delete(w);
  }

  /** @internal */
  checkOpen(): void {
    if (this.closed) throw new BlocksnapError('E_STORE_IO', 'chunk store is closed');
  }
}

const NOT_STORED: PutResult = Object.freeze({ stored: false, storedBytes: 0 });
const ZERO_BLOCK = Buffer.alloc(64 * 1024);

function isAllZero(buf: Buffer): boolean {
  for (let off = 0; off < buf.length; off += ZERO_BLOCK.length) {
    const end = Math.min(buf.length, off + ZERO_BLOCK.length);
    if (!buf.subarray(off, end).equals(ZERO_BLOCK.subarray(0, end - off))) return false;
  }
  return true;
}

/** A blob another writer holds unflushed; kept so our flush does not depend on theirs. */
interface Borrowed {
  type: BlobType;
  digest: Buffer;
  codec: Codec;
  plainLength: number;
  payload: Buffer;
}

/**
 * One ingest's writer. Digests of its unindexed packs are in `pending`; a
 * digest another writer holds unflushed is "borrowed": not stored now, but
 * re-checked at our flush and stored by us if that writer has not made it
 * durable yet (it may still abort), so a flush never promises a blob that
 * is not durable. Duplicates across packs are harmless (§3.1).
 */
class FsBlobWriter implements BlobWriter {
  /** Pending packs this writer made or depends on (DESIGN.md §5). */
  readonly pins = new Set<string>();
  /** Digests this writer de-duplicated against the index (GC safety, DESIGN.md §12.3). */
  readonly hits = new HitFilter();
  /** Pins not yet in the journal. */
  readonly unsaved: string[] = [];
  /** Roots (hex) this writer stored or de-duplicated: it committed if a committed image has one. */
  readonly roots = new Set<string>();
  readonly unsavedRoots: Buffer[] = [];
  private pack: PackWriter | undefined;
  private packKeys: string[] = [];
  private readonly pending = new Set<string>();
  private readonly borrowed = new Map<string, Borrowed>();
  private readonly closing = new Set<Promise<void>>();
  private bytesSinceFlush = 0;
  private failure: BlocksnapError | undefined;
  private done = false;

  constructor(
    private readonly store: FsChunkStore,
    readonly id: string,
  ) {}

  holds(key: string): boolean {
    return this.pending.has(key);
  }

  async put(type: BlobType, digest: Buffer, plain: Buffer, compressed?: Buffer): Promise<PutResult> {
    this.check();
    if (digest.length !== 32) throw new BlocksnapError('E_STORE_IO', `digest is ${digest.length} bytes`);
    if (type !== 1 && type !== 2 && type !== 3) throw new BlocksnapError('E_STORE_IO', `unknown blob type ${type}`);
    if (plain.length === 0) throw new BlocksnapError('E_STORE_IO', 'refusing to store an empty blob');
    if (digest.equals(ZERO_DIGEST) || isAllZero(plain)) {
      throw new BlocksnapError('E_STORE_IO', 'refusing to store an all-zero blob: record ZERO instead');
    }
    const key = digest.toString('hex');
    if (type === 3 && !this.roots.has(key)) {
      this.roots.add(key);
      this.unsavedRoots.push(Buffer.from(digest));
    }
    if (this.pending.has(key) || this.borrowed.has(key) || this.store.dedupHit(digest, this)) return NOT_STORED;
    let codec: Codec = CODEC_NONE;
    let payload = plain;
    if (compressed) {
      const declared = zstdDeclaredSize(compressed);
      if (declared !== null && declared !== plain.length) {
        throw new BlocksnapError('E_INTERNAL', `compressed form of ${key} declares ${declared} bytes, plain has ${plain.length}`);
      }
      // The agent's frame is stored as-is; recompressing would cost a core.
      if (compressed.length < plain.length) [codec, payload] = [CODEC_ZSTD, compressed];
    } else {
      const c = zstdCompress(plain, this.store.options.compressionLevel);
      if (c.length < plain.length) [codec, payload] = [CODEC_ZSTD, c];
    }
    if (this.store.pendingElsewhere(key, this)) {
      this.borrowed.set(key, { type, digest: Buffer.from(digest), codec, plainLength: plain.length, payload: Buffer.from(payload) });
      return NOT_STORED;
    }
    await this.append(key, type, digest, codec, plain.length, payload);
    return { stored: true, storedBytes: payload.length };
  }

  async flush(): Promise<number> {
    this.check();
    for (const [key, b] of this.borrowed) {
      this.borrowed.delete(key);
      if (this.pending.has(key) || this.store.dedupHit(b.digest, this)) continue;
      await this.append(key, b.type, b.digest, b.codec, b.plainLength, b.payload);
    }
    this.seal();
    await Promise.allSettled([...this.closing]);
    this.check();
    try {
      this.store.saveJournal(this);
    } catch (e) {
      this.failure ??= e instanceof BlocksnapError ? e : new BlocksnapError('E_STORE_IO', String(e), { cause: e });
      throw this.failure;
    }
    const n = this.bytesSinceFlush;
    this.bytesSinceFlush = 0;
    return n;
  }

  async abort(opts: { uncommitted?: boolean } = {}): Promise<void> {
    if (this.done) return;
    this.done = true;
    const pack = this.pack;
    this.pack = undefined;
    for (const k of this.packKeys) this.pending.delete(k);
    this.packKeys = [];
    this.borrowed.clear();
    try {
      await pack?.abort();
      // Packs already sealed by a rollover finish first, then go with the rest.
      await Promise.allSettled([...this.closing]);
    } finally {
      this.pending.clear();
      this.store.release(this);
    }
    await this.store.dropWriter(this, opts.uncommitted ?? false);
  }

  /**
   * Everything up to the copy into the pack is synchronous, so a second put
   * of the same digest racing this one already sees it pending.
   */
  private async append(key: string, type: BlobType, digest: Buffer, codec: Codec, plainLength: number, payload: Buffer): Promise<void> {
    if (this.pack && this.pack.sizeWith(payload.length) > this.store.options.targetPackSize) this.seal();
    try {
      this.pack ??= new PackWriter(this.store.tmpDir, this.store.packsDir, this.store.options.writeBufferSize);
      this.pending.add(key);
      this.packKeys.push(key);
      this.store.activate(this);
      await this.pack.append(digest, type, codec, plainLength, payload);
    } catch (e) {
      this.failure ??= e instanceof BlocksnapError ? e : new BlocksnapError('E_STORE_IO', String(e), { cause: e });
      throw this.failure;
    }
    // Back-pressure: at most one sealed pack may still be syncing behind us.
    while (this.closing.size > 1) await Promise.race(this.closing);
    this.check();
  }

  /** Closes the current pack in the background: finish, then index rows, then release its digests. */
  private seal(): void {
    const pack = this.pack;
    if (!pack) return;
    const keys = this.packKeys;
    this.pack = undefined;
    this.packKeys = [];
    const p = (async () => {
      try {
        const done = await pack.finish((id) => this.store.journalOwnPack(id, this));
        const winners = this.store.index.insertPack(done);
        this.store.packIndexed(done.id, done.size, done.entries.map((e) => e.digest), winners, this);
        this.bytesSinceFlush += done.size;
      } catch (e) {
        this.failure ??= e instanceof BlocksnapError ? e : new BlocksnapError('E_STORE_IO', String(e), { cause: e });
        await pack.abort();
      } finally {
        // Same tick as the insert: a digest is always either pending or indexed.
        for (const k of keys) this.pending.delete(k);
        if (this.pending.size === 0) this.store.release(this);
      }
    })();
    this.closing.add(p);
    void p.finally(() => this.closing.delete(p));
  }

  private check(): void {
    this.store.checkOpen();
    if (this.done) throw new BlocksnapError('E_STORE_IO', 'blob writer was aborted');
    if (this.failure) throw this.failure;
  }
}
