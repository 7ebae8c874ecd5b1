/**
 * A data directory with catalog, chunk store and manifest store, and a
 * `commit` that makes an image of an in-memory volume through the real
 * Ingest and the real commit (no agent, no socket): the GC and prune tests
 * and the GC benchmark build many images in seconds with it.
 */
import { createHash, randomBytes } from 'node:crypto';
import { join } from 'node:path';
import pino, { type Logger } from 'pino';
import { Catalog } from '../catalog/catalog.js';
import { commitImage, rollForward } from '../jobs/image-commit.js';
import { Ingest, type IngestChunk } from '../server/ingest.js';
import { FsChunkStore, type FsChunkStoreOptions } from '../store/fs-chunk-store.js';
import { FsManifestStore } from '../store/fs-manifest-store.js';
import { ImageIndexReader } from '../store/image-index.js';
import { ZERO_DIGEST } from '../store/chunk-store.js';
import type { Manifest } from '../store/manifest.js';
import { imageRootDigest } from '../../proto/shared/image-root.js';
import { zstdCompress } from '../../proto/shared/zstd.js';
import { makePrivateDir } from '../../proto/shared/durable-file.js';
import { Retention, type RetentionDeps } from './retention-service.js';
import { finishDeletions } from './retention-catalog.js';

/** A volume held in memory (the shape of appliance/testing/scripted-agent.ts's, which is not built into dist/). */
export interface RigVolume { name: string; size: number; chunkSize: number; data: Buffer }

/**
 * Chunk digests (null = ZERO) by the volume's data buffer, filled on first use
 * and carried over by mutateRigVolume, so a 1 GiB volume is not re-hashed per
 * image. Keyed by the buffer: a copy made elsewhere starts without one.
 */
const digestCache = new WeakMap<Buffer, (Buffer | null | undefined)[]>();

/** Random content, the listed chunks all-zero. */
export function rigVolume(name: string, size: number, chunkSize: number, zeroChunks: number[] = []): RigVolume {
  const v = { name, size, chunkSize, data: randomBytes(size) };
  for (const i of zeroChunks) plainOf(v, i).fill(0);
  return v;
}

/** A copy of `v` whose listed chunks got new random content. */
export function mutateRigVolume(v: RigVolume, chunks: number[]): RigVolume {
  const next = { ...v, data: Buffer.from(v.data) };
  const known = digestCache.get(v.data);
  const digests = known ? [...known] : undefined;
  for (const i of chunks) {
    randomBytes(plainOf(next, i).length).copy(plainOf(next, i));
    if (digests) digests[i] = undefined;
  }
  if (digests) digestCache.set(next.data, digests);
  return next;
}

/** The same in place (the benchmark's 1 GiB volume is not copied per image); cached digests of those chunks are dropped. */
export function mutateRigVolumeInPlace(v: RigVolume, chunks: number[]): RigVolume {
  const known = digestCache.get(v.data);
  for (const i of chunks) {
    randomBytes(plainOf(v, i).length).copy(plainOf(v, i));
    if (known) known[i] = undefined;
  }
  return v;
}

const chunkCountOf = (v: RigVolume) => Math.ceil(v.size / v.chunkSize);
const plainOf = (v: RigVolume, i: number) => v.data.subarray(i * v.chunkSize, Math.min((i + 1) * v.chunkSize, v.size));
const sha256 = (b: Uint8Array) => createHash('sha256').update(b).digest();
const ZEROS = Buffer.alloc(4 << 20);
const isZero = (b: Buffer) => b.equals(ZEROS.subarray(0, b.length));

function goodChunk(v: RigVolume, i: number): IngestChunk {
  const plain = plainOf(v, i);
  if (isZero(plain)) return { index: i, digest: Buffer.alloc(0), zero: true, data: Buffer.alloc(0), plainLength: plain.length };
  return { index: i, digest: sha256(plain), zero: false, data: zstdCompress(plain), plainLength: plain.length };
}

function expectedRootOf(v: RigVolume): Buffer {
  const n = chunkCountOf(v);
  let cached = digestCache.get(v.data);
  if (!cached) digestCache.set(v.data, (cached = new Array(n)));
  const digests = Buffer.alloc(n * 32);
  for (let i = 0; i < n; i++) {
    let d = cached[i];
    if (d === undefined) {
      const plain = plainOf(v, i);
      d = cached[i] = isZero(plain) ? null : sha256(plain);
    }
    d?.copy(digests, i * 32);
  }
  return imageRootDigest(v.size, v.chunkSize, digests);
}

export interface RigOptions extends FsChunkStoreOptions {
  retention?: Partial<RetentionDeps>;
}

export class StoreRig {
  readonly log: Logger;
  retention!: Retention;

  private constructor(
    readonly dataDir: string,
    public store: FsChunkStore,
    readonly manifests: FsManifestStore,
    public catalog: Catalog,
    private readonly opts: RigOptions,
  ) {
    this.log = opts.logger ?? pino({ level: 'silent' });
    this.makeRetention();
  }

  static async open(dataDir: string, opts: RigOptions = {}): Promise<StoreRig> {
    await makePrivateDir(dataDir);
    const catalog = Catalog.open(join(dataDir, 'catalog.sqlite'));
    const log = opts.logger ?? pino({ level: 'silent' });
    const store = await FsChunkStore.open(join(dataDir, 'store'), { ...opts, logger: log, dataDir });
    const manifests = new FsManifestStore(join(dataDir, 'store'), dataDir);
    // What the appliance does at start (appliance.ts): deletions finished, roll-forward, pending packs resolved.
    await finishDeletions(catalog, manifests);
    await rollForward(catalog, manifests, true, log);
    await store.resolvePending((r) => catalog.hasRoot(r));
    if (!catalog.agent('db1')) catalog.addAgent('db1');
    return new StoreRig(dataDir, store, manifests, catalog, opts);
  }

  private makeRetention(): void {
    this.retention = new Retention({ catalog: this.catalog, store: this.store, manifests: this.manifests, log: this.log, ...this.opts.retention });
  }

  /** Opens an ingest for `v` (incremental on the volume's last image when asked and there is one). */
  async begin(v: RigVolume, incremental: boolean, agent = 'db1'): Promise<{ ingest: Ingest; basisImageId: string | null; volumeId: number }> {
    const a = this.catalog.agent(agent)!;
    const vol = this.catalog.upsertVolume(a.id, v.name, v.size, v.chunkSize);
    const basis = incremental ? this.catalog.lastImage(vol.id) : undefined;
    const ingest = await Ingest.open(this.store, {
      jobId: `job-${randomBytes(4).toString('hex')}`, volumeSize: v.size, chunkSize: v.chunkSize,
      mode: basis ? 'incremental' : 'full', basisRootDigest: basis ? Buffer.from(basis.rootDigest, 'hex') : undefined,
    }, this.log);
    return { ingest, basisImageId: basis?.id ?? null, volumeId: vol.id };
  }

  /** Sends chunks `indexes` (all when omitted) of `v` in batches. */
  static async send(ingest: Ingest, v: RigVolume, indexes?: number[], batch = 64): Promise<void> {
    const list = indexes ?? Array.from({ length: chunkCountOf(v) }, (_, i) => i);
    for (let i = 0; i < list.length; i += batch) {
      const chunks = list.slice(i, i + batch).map((n) => goodChunk(v, n));
      await ingest.addBatch(ingest.seq + 1, chunks);
    }
  }

  /** Seals and commits what `ingest` received as an image of `v`. */
  async seal(ingest: Ingest, v: RigVolume, basisImageId: string | null, agent = 'db1'): Promise<Manifest> {
    const { rootDigest } = await ingest.finish(chunkCountOf(v), expectedRootOf(v));
    const s = ingest.stats;
    return commitImage({ catalog: this.catalog, manifests: this.manifests, log: this.log, agent, jobId: ingest.params.jobId, pg: undefined }, {
      volume: v.name, volumeSize: v.size, chunkSize: v.chunkSize, kind: ingest.params.mode, basisImageId, rootDigest,
      stats: {
        chunksTotal: ingest.chunkCount, chunksReceived: s.chunksReceived, chunksZero: s.chunksZero, chunksStored: s.chunksStored,
        bytesReceived: s.bytesReceived, bytesStored: s.bytesStored, pagesWritten: s.pagesWritten, pagesShared: s.pagesShared,
        resumes: 0, chunksRead: s.chunksReceived, bytesRead: s.bytesReceived, freezeSeconds: 0,
      },
    });
  }

  /** One image of `v`: a full, or an incremental sending only `changed` (every chunk when omitted). */
  async commit(v: RigVolume, changed?: number[], agent = 'db1'): Promise<Manifest> {
    const { ingest, basisImageId } = await this.begin(v, changed !== undefined, agent);
    try {
      await StoreRig.send(ingest, v, basisImageId ? changed : undefined);
      return await this.seal(ingest, v, basisImageId, agent);
    } catch (e) {
      await ingest.abort();
      throw e;
    }
  }

  /** Reopens the store and catalog as a restarted appliance would. */
  async reopen(): Promise<void> {
    await this.store.close();
    this.catalog.close();
    const r = await StoreRig.open(this.dataDir, this.opts);
    this.store = r.store;
    this.catalog = r.catalog;
    this.makeRetention();
  }

  async close(): Promise<void> {
    await this.store.close();
    this.catalog.close();
  }
}

/**
 * Stored bytes of the distinct blobs (roots, index pages, chunks) the images
 * with these roots need, counted from the blob index independently of GC's
 * mark: what a store holding exactly those images would keep. A blob missing
 * from the index throws.
 */
export async function neededBytes(store: FsChunkStore, roots: string[]): Promise<number> {
  const seen = new Set<string>();
  let bytes = 0;
  const add = (d: Buffer): void => {
    const hex = d.toString('hex');
    if (d.equals(ZERO_DIGEST) || seen.has(hex)) return;
    seen.add(hex);
    const loc = store.locate(d);
    if (!loc) throw new Error(`blob ${hex} is missing`);
    bytes += loc.storedLength;
  };
  for (const r of roots) {
    const root = Buffer.from(r, 'hex');
    add(root);
    const reader = await ImageIndexReader.open(store, root);
    for (let p = 0; p < reader.pageCount; p++) {
      add(reader.pageDigest(p));
      const page = await reader.loadPage(p);
      for (let k = 0; page && k < page.length; k += 32) add(page.subarray(k, k + 32));
    }
  }
  return bytes;
}
