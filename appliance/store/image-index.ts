/**
 * Virtual-full image map (DESIGN.md §3.3): pages of 1024 chunk digests under
 * a root (layout in proto/shared/image-root.ts). The builder clones the basis so an
 * incremental costs O(changed pages) blob work plus one root; the reader walks
 * a committed image page by page.
 */
import { createHash } from 'node:crypto';
import { BlocksnapError } from '../../proto/errors.js';
import { BLOB_PAGE, BLOB_ROOT, ZERO_DIGEST, type BlobWriter, type ChunkStore } from './chunk-store.js';
import {
  DIGEST_BYTES,
  PAGE_BYTES,
  SLOTS_PER_PAGE,
  decodeRoot,
  encodeRoot,
  imageGeometry,
  type ImageGeometry,
  type ImageRoot,
} from '../../proto/shared/image-root.js';

const ZERO_PAGE = Buffer.alloc(PAGE_BYTES);

function sha256(buf: Buffer): Buffer {
  return createHash('sha256').update(buf).digest();
}

function isZeroDigestAt(buf: Buffer, offset: number): boolean {
  return buf.compare(ZERO_DIGEST, 0, DIGEST_BYTES, offset, offset + DIGEST_BYTES) === 0;
}

/** A stored page must be exactly one page long and ZERO past the volume end. */
export function checkPage(page: Buffer, p: number, g: ImageGeometry): void {
  if (page.length !== PAGE_BYTES) {
    throw new BlocksnapError('E_FORMAT', `index page ${p}: ${page.length} bytes, expected ${PAGE_BYTES}`);
  }
  const used = Math.min(SLOTS_PER_PAGE, g.chunkCount - p * SLOTS_PER_PAGE);
  if (!page.subarray(used * DIGEST_BYTES).equals(ZERO_PAGE.subarray(used * DIGEST_BYTES))) {
    throw new BlocksnapError('E_FORMAT', `index page ${p}: slots past the volume end are not ZERO`);
  }
}

async function loadRoot(store: ChunkStore, rootDigest: Buffer): Promise<ImageRoot> {
  return decodeRoot(await store.get(rootDigest));
}

export interface ImageIndexBuilderOptions {
  store: ChunkStore;
  writer: BlobWriter;
  volumeSize: number;
  chunkSize: number;
  /** The image this one is an incremental of; omitted for a full. */
  basis?: { rootDigest: Buffer };
}

export interface ImageIndexResult {
  rootDigest: Buffer;
  rootBytes: number;
  chunkCount: number;
  pageCount: number;
  /** writer.put calls for pages (each a page whose content changed). */
  pagesWritten: number;
  /** Of those, how many the store did not already hold. */
  pagesStored: number;
  /** Non-ZERO pages kept from the basis unchanged. */
  pagesShared: number;
  pagesZero: number;
}

/**
 * Builds one image from chunk digests given in strictly increasing index
 * order (the order chunks arrive in). At most one page is open; call
 * `finish()` once, then flush the writer.
 */
export class ImageIndexBuilder {
  readonly geometry: ImageGeometry;
  private readonly store: ChunkStore;
  private readonly writer: BlobWriter;
  private readonly basisRoot: Buffer | null;
  /** Page digests of the image being built; the basis's until patched. Null until the basis is loaded. */
  private pages: Buffer | null;
  private readonly page = Buffer.alloc(PAGE_BYTES);
  private openPage = -1;
  private dirty = false;
  private lastIndex = -1;
  private busy = false;
  private state: 'open' | 'finished' | 'broken' = 'open';
  private pagesWritten = 0;
  private pagesStored = 0;

  /** The basis root is loaded on first use; `create` or `ready()` loads it now. */
  constructor(opts: ImageIndexBuilderOptions) {
    this.geometry = imageGeometry(opts.volumeSize, opts.chunkSize);
    this.store = opts.store;
    this.writer = opts.writer;
    this.basisRoot = opts.basis ? Buffer.from(opts.basis.rootDigest) : null;
    this.pages = this.basisRoot ? null : Buffer.alloc(this.geometry.pageCount * DIGEST_BYTES);
  }

  static async create(opts: ImageIndexBuilderOptions): Promise<ImageIndexBuilder> {
    const builder = new ImageIndexBuilder(opts);
    await builder.ready();
    return builder;
  }

  /** Load and check the basis (E_BASIS on a geometry mismatch) before any chunk arrives. */
  async ready(): Promise<void> {
    if (this.pages) return;
    this.checkUsable();
    await this.guard(() => this.loadBasis());
  }

  private async loadBasis(): Promise<void> {
    if (this.pages || !this.basisRoot) return;
    const basis = await loadRoot(this.store, this.basisRoot);
    const g = this.geometry;
    if (basis.volumeSize !== g.volumeSize || basis.chunkSize !== g.chunkSize) {
      throw new BlocksnapError(
        'E_BASIS',
        `basis is ${basis.volumeSize} bytes / ${basis.chunkSize}-byte chunks, volume is ${g.volumeSize} / ${g.chunkSize}`,
      );
    }
    this.pages = basis.pages;
  }

  /** Record chunk `index`'s digest (ZERO_DIGEST for an all-zero chunk). */
  async set(index: number, digest: Buffer): Promise<void> {
    this.checkUsable();
    if (!Number.isSafeInteger(index) || index < 0 || index >= this.geometry.chunkCount) {
      throw new BlocksnapError('E_CHUNK_RANGE', `chunk ${index} outside 0..${this.geometry.chunkCount - 1}`);
    }
    if (index <= this.lastIndex) {
      throw new BlocksnapError('E_PROTOCOL', `chunk ${index} is not above the previous chunk ${this.lastIndex}`);
    }
    if (digest.length !== DIGEST_BYTES) {
      throw new BlocksnapError('E_PROTOCOL', `digest of chunk ${index} is ${digest.length} bytes`);
    }
    this.lastIndex = index;
    const p = Math.floor(index / SLOTS_PER_PAGE);
    if (p !== this.openPage) {
      await this.guard(async () => {
        await this.loadBasis();
        await this.moveTo(p);
      });
    }
    const off = (index % SLOTS_PER_PAGE) * DIGEST_BYTES;
    if (this.page.compare(digest, 0, DIGEST_BYTES, off, off + DIGEST_BYTES) !== 0) {
      digest.copy(this.page, off);
      this.dirty = true;
    }
  }

  /** Close the open page, store the root; the caller flushes the writer. */
  async finish(): Promise<ImageIndexResult> {
    this.checkUsable();
    return this.guard(async () => {
      await this.loadBasis();
      await this.closePage();
      this.state = 'finished';
      const pages = this.pagesOrThrow();
      const root = encodeRoot({ ...this.geometry, pages });
      const rootDigest = sha256(root);
      await this.writer.put(BLOB_ROOT, rootDigest, root);
      let pagesZero = 0;
      for (let off = 0; off < pages.length; off += DIGEST_BYTES) {
        if (isZeroDigestAt(pages, off)) pagesZero++;
      }
      const { chunkCount, pageCount } = this.geometry;
      return {
        rootDigest,
        rootBytes: root.length,
        chunkCount,
        pageCount,
        pagesWritten: this.pagesWritten,
        pagesStored: this.pagesStored,
        pagesShared: pageCount - pagesZero - this.pagesWritten,
        pagesZero,
      };
    });
  }

  private checkUsable(): void {
    if (this.state !== 'open') throw new BlocksnapError('E_PROTOCOL', `image index builder is ${this.state}`);
    if (this.busy) throw new BlocksnapError('E_PROTOCOL', 'image index builder used concurrently');
  }

  /** A failure halfway through page work leaves the map unknown: refuse further use. */
  private async guard<T>(work: () => Promise<T>): Promise<T> {
    this.busy = true;
    try {
      return await work();
    } catch (e) {
      this.state = 'broken';
      throw e;
    } finally {
      this.busy = false;
    }
  }

  private pagesOrThrow(): Buffer {
    if (!this.pages) throw new BlocksnapError('E_INTERNAL', 'image index basis not loaded');
    return this.pages;
  }

  private async moveTo(p: number): Promise<void> {
    await this.closePage();
    const pages = this.pagesOrThrow();
    const off = p * DIGEST_BYTES;
    if (isZeroDigestAt(pages, off)) {
      this.page.fill(0);
    } else {
      const basisPage = await this.store.get(Buffer.from(pages.subarray(off, off + DIGEST_BYTES)));
      checkPage(basisPage, p, this.geometry);
      basisPage.copy(this.page);
    }
    this.openPage = p;
    this.dirty = false;
  }

  private async closePage(): Promise<void> {
    const p = this.openPage;
    if (p < 0) return;
    this.openPage = -1;
    if (!this.dirty) return; // content equals the basis page: keep its digest
    const pages = this.pagesOrThrow();
    const off = p * DIGEST_BYTES;
    if (this.page.equals(ZERO_PAGE)) {
      ZERO_DIGEST.copy(pages, off);
      return;
    }
    const digest = sha256(this.page);
    // A copy: the writer may hold the bytes until flush, and this.page is reused.
    const res = await this.writer.put(BLOB_PAGE, digest, Buffer.from(this.page));
    this.pagesWritten++;
    if (res.stored) this.pagesStored++;
    digest.copy(pages, off);
  }
}

export interface IndexEntry {
  index: number;
  /** A view into a loaded page (or the shared ZERO_DIGEST): read-only. */
  digest: Buffer;
}

export interface IndexPage {
  page: number;
  /** Chunk index of slot 0. */
  firstIndex: number;
  /** The 32 KiB page, or null for a ZERO page. Read-only. */
  digests: Buffer | null;
}

export interface EntriesOptions {
  from?: number;
  to?: number;
  /** Leave out ZERO entries (ZERO pages are then never visited). */
  skipZero?: boolean;
}

/**
 * Pages an ImageIndexReader keeps loaded (32 KiB each, only pages touched:
 * ≤ 4 MiB per open image; 128 pages map 8 GiB at 64 KiB chunks).
 */
const PAGE_CACHE = 128;

/** Read access to one committed image's map. */
export class ImageIndexReader {
  /** PAGE_CACHE; benchmarks set it to compare (scripts/bench-mount.ts BENCH_PAGE_CACHE). */
  static pageCacheSize = PAGE_CACHE;
  /**
   * Recently loaded pages (LRU, loads shared): readers that walk several
   * regions at once (nbdcopy's connections each take their own part of the
   * image) would otherwise reload and re-hash a 32 KiB page per chunk.
   */
  private readonly pageCache = new Map<number, Promise<Buffer>>();

  private constructor(
    private readonly store: ChunkStore,
    readonly rootDigest: Buffer,
    private readonly root: ImageRoot,
  ) {}

  static async open(store: ChunkStore, rootDigest: Buffer): Promise<ImageIndexReader> {
    return new ImageIndexReader(store, Buffer.from(rootDigest), await loadRoot(store, rootDigest));
  }

  get volumeSize(): number { return this.root.volumeSize; }
  get chunkSize(): number { return this.root.chunkSize; }
  get chunkCount(): number { return this.root.chunkCount; }
  get pageCount(): number { return this.root.pageCount; }

  pageDigest(p: number): Buffer {
    if (!Number.isInteger(p) || p < 0 || p >= this.root.pageCount) {
      throw new BlocksnapError('E_CHUNK_RANGE', `page ${p} outside 0..${this.root.pageCount - 1}`);
    }
    return Buffer.from(this.root.pages.subarray(p * DIGEST_BYTES, (p + 1) * DIGEST_BYTES));
  }

  /** Every page digest, ZERO included (for GC and verify). */
  pageDigests(): Buffer[] {
    const out: Buffer[] = [];
    for (let p = 0; p < this.root.pageCount; p++) out.push(this.pageDigest(p));
    return out;
  }

  /** Page p's slots, or null when the page is ZERO (nothing is loaded). */
  async loadPage(p: number): Promise<Buffer | null> {
    const digest = this.pageDigest(p);
    if (digest.equals(ZERO_DIGEST)) return null;
    let page = this.pageCache.get(p);
    if (page) {
      this.pageCache.delete(p);
    } else {
      page = this.store.get(digest).then((b) => {
        checkPage(b, p, this.root);
        return b;
      });
      // A failed load is not kept: the next read tries again.
      page.catch(() => { if (this.pageCache.get(p) === page) this.pageCache.delete(p); });
    }
    this.pageCache.set(p, page);
    if (this.pageCache.size > ImageIndexReader.pageCacheSize) this.pageCache.delete(this.pageCache.keys().next().value!);
    return page;
  }

  async digestAt(index: number): Promise<Buffer> {
    this.checkIndex(index, this.root.chunkCount - 1);
    const page = await this.loadPage(Math.floor(index / SLOTS_PER_PAGE));
    if (!page) return ZERO_DIGEST;
    const off = (index % SLOTS_PER_PAGE) * DIGEST_BYTES;
    return Buffer.from(page.subarray(off, off + DIGEST_BYTES));
  }

  /** Pages covering [from, to), each loaded once; the bulk path for big images. */
  async *pages(opts: EntriesOptions = {}): AsyncGenerator<IndexPage> {
    const [from, to] = this.range(opts);
    if (from >= to) return;
    const last = Math.floor((to - 1) / SLOTS_PER_PAGE);
    for (let p = Math.floor(from / SLOTS_PER_PAGE); p <= last; p++) {
      const zero = isZeroDigestAt(this.root.pages, p * DIGEST_BYTES);
      if (zero && opts.skipZero) continue;
      yield { page: p, firstIndex: p * SLOTS_PER_PAGE, digests: zero ? null : await this.loadPage(p) };
    }
  }

  async *entries(opts: EntriesOptions = {}): AsyncGenerator<IndexEntry> {
    const [from, to] = this.range(opts);
    for await (const { firstIndex, digests } of this.pages(opts)) {
      const end = Math.min(to, firstIndex + SLOTS_PER_PAGE);
      for (let index = Math.max(from, firstIndex); index < end; index++) {
        if (!digests) {
          yield { index, digest: ZERO_DIGEST };
          continue;
        }
        const off = (index - firstIndex) * DIGEST_BYTES;
        if (opts.skipZero && isZeroDigestAt(digests, off)) continue;
        yield { index, digest: digests.subarray(off, off + DIGEST_BYTES) };
      }
    }
  }

  private range(opts: EntriesOptions): [number, number] {
    const from = opts.from ?? 0;
    const to = opts.to ?? this.root.chunkCount;
    this.checkIndex(from, this.root.chunkCount);
    this.checkIndex(to, this.root.chunkCount);
    return [from, to];
  }

  private checkIndex(i: number, max: number): void {
    if (!Number.isSafeInteger(i) || i < 0 || i > max) {
      throw new BlocksnapError('E_CHUNK_RANGE', `chunk ${i} outside 0..${max}`);
    }
  }
}
