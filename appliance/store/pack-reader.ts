/**
 * Reading pack files (layout in pack-format.ts): list the packs of a store,
 * open one, validate footer + trailer and list its entries, and read a blob
 * by location with decompression and re-hash. `PackReaderCache` keeps a few
 * dozen read handles open (LRU) so restores do not pay an open per blob.
 */
import { createHash } from 'node:crypto';
import { open, readdir, type FileHandle } from 'node:fs/promises';
import { join } from 'node:path';
import { BlocksnapError } from '../../proto/errors.js';
import {
  checkTrailer,
  CODEC_NONE,
  CODEC_ZSTD,
  decodeFooter,
  decodeHeader,
  FOOTER_SIZE,
  PACK_HEADER_SIZE,
  PACK_ID_RE,
  packRelPath,
  TRAILER_ENTRY_SIZE,
  type TrailerEntry,
} from './pack-format.js';
import { zstdDecompress } from '../../proto/shared/zstd.js';

export interface StoredBlobRef {
  offset: number;
  storedLength: number;
  plainLength: number;
  codec: number;
}

function corrupt(pack: string, what: string, cause?: unknown): BlocksnapError {
  const why = cause instanceof Error ? `: ${cause.message}` : '';
  return new BlocksnapError('E_STORE_CORRUPT', `pack ${pack}: ${what}${why}`, { cause });
}

/** Decodes a stored payload and checks it hashes to `digest`. */
export function decodeBlob(pack: string, digest: Buffer, stored: Buffer, ref: StoredBlobRef): Buffer {
  const hex = digest.toString('hex');
  let plain: Buffer;
  if (ref.codec === CODEC_ZSTD) {
    try {
      plain = zstdDecompress(stored, ref.plainLength);
    } catch (e) {
      throw corrupt(pack, `blob ${hex} does not decompress`, e);
    }
  } else if (ref.codec === CODEC_NONE) {
    if (stored.length !== ref.plainLength) throw corrupt(pack, `blob ${hex} has ${stored.length} bytes, expected ${ref.plainLength}`);
    plain = stored;
  } else {
    throw corrupt(pack, `blob ${hex} has unknown codec ${ref.codec}`);
  }
  if (!createHash('sha256').update(plain).digest().equals(digest)) {
    throw corrupt(pack, `blob ${hex} fails its digest`);
  }
  return plain;
}

export class PackReader {
  private constructor(
    readonly id: string,
    readonly path: string,
    readonly size: number,
    private readonly fh: FileHandle,
  ) {}

  /** Opens a pack for reading; the footer is only checked by `entries()`. */
  static async open(path: string, id: string): Promise<PackReader> {
    let fh: FileHandle;
    try {
      fh = await open(path, 'r');
    } catch (e) {
      throw corrupt(id, `cannot open ${path}`, e);
    }
    try {
      const { size } = await fh.stat();
      return new PackReader(id, path, size, fh);
    } catch (e) {
      await fh.close().catch(() => undefined);
      throw corrupt(id, `cannot stat ${path}`, e);
    }
  }

  /** Validates header, footer and trailer checksum; returns the entries in write order. */
  async entries(): Promise<TrailerEntry[]> {
    if (this.size < PACK_HEADER_SIZE + FOOTER_SIZE) throw corrupt(this.id, `file is only ${this.size} bytes`);
    try {
      decodeHeader(await this.readExact(0, PACK_HEADER_SIZE));
      const footer = decodeFooter(await this.readExact(this.size - FOOTER_SIZE, FOOTER_SIZE));
      const trailerLen = footer.entryCount * TRAILER_ENTRY_SIZE;
      if (footer.trailerOffset + trailerLen + FOOTER_SIZE !== this.size) {
        throw new BlocksnapError('E_FORMAT', 'footer does not match the file size');
      }
      return checkTrailer(footer, await this.readExact(footer.trailerOffset, trailerLen), this.size);
    } catch (e) {
      if (e instanceof BlocksnapError && e.code === 'E_STORE_CORRUPT') throw e;
      throw corrupt(this.id, 'invalid footer or trailer', e);
    }
  }

  /** The open descriptor, for a worker thread that reads this pack while a `use()` of it holds it open. */
  get fd(): number {
    return this.fh.fd;
  }

  /** The stored (possibly compressed) bytes of a blob. */
  async readStored(offset: number, length: number): Promise<Buffer> {
    return this.readExact(offset, length);
  }

  /**
   * The stored bytes from `offset` on, as many as `buffers` hold, back to
   * back into them (vectored reads; a short read continues). For a restore,
   * which reads adjacent blobs with one call straight into its outgoing layout.
   */
  async readStoredv(offset: number, buffers: Uint8Array[]): Promise<void> {
    let rest = buffers.filter((b) => b.length > 0);
    let at = offset;
    while (rest.length > 0) {
      let n: number;
      try {
        ({ bytesRead: n } = await this.fh.readv(rest.slice(0, 1024), at));
      } catch (e) {
        throw new BlocksnapError('E_STORE_IO', `pack ${this.id}: read at ${at}: ${(e as Error).message}`, { cause: e });
      }
      if (n === 0) throw corrupt(this.id, `short read at ${at}, file ends first`);
      at += n;
      while (n > 0) {
        const b = rest[0]!;
        if (n >= b.length) {
          n -= b.length;
          rest = rest.slice(1);
        } else {
          rest = [b.subarray(n), ...rest.slice(1)];
          n = 0;
        }
      }
    }
  }

  /** The plain bytes of a blob, decompressed and re-hashed. */
  async readBlob(digest: Buffer, ref: StoredBlobRef): Promise<Buffer> {
    return decodeBlob(this.id, digest, await this.readExact(ref.offset, ref.storedLength), ref);
  }

  async close(): Promise<void> {
    await this.fh.close();
  }

  private async readExact(offset: number, length: number): Promise<Buffer> {
    const buf = Buffer.allocUnsafe(length);
    let done = 0;
    while (done < length) {
      let n: number;
      try {
        ({ bytesRead: n } = await this.fh.read(buf, done, length - done, offset + done));
      } catch (e) {
        throw new BlocksnapError('E_STORE_IO', `pack ${this.id}: read at ${offset + done}: ${(e as Error).message}`, { cause: e });
      }
      if (n === 0) throw corrupt(this.id, `short read: ${length} bytes at ${offset}, file ends first`);
      done += n;
    }
    return buf;
  }
}

/** Every well-named pack under packs/HH/; anything else there is ignored. */
export async function listPackFiles(packsDir: string): Promise<{ id: string; path: string }[]> {
  const out: { id: string; path: string }[] = [];
  let dirs: string[];
  try {
    dirs = await readdir(packsDir);
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === 'ENOENT') return out;
    throw e;
  }
  for (const hh of dirs.sort()) {
    if (!/^[0-9a-f]{2}$/.test(hh)) continue;
    for (const name of (await readdir(join(packsDir, hh))).sort()) {
      const id = name.endsWith('.pack') ? name.slice(0, -5) : '';
      if (PACK_ID_RE.test(id) && id.startsWith(hh)) out.push({ id, path: join(packsDir, hh, name) });
    }
  }
  return out;
}

interface CacheSlot {
  reader: Promise<PackReader>;
  users: number;
}

/** LRU of open pack readers; a reader in use is never closed under its user. */
export class PackReaderCache {
  private readonly slots = new Map<string, CacheSlot>();

  constructor(
    private readonly packsDir: string,
    private readonly capacity = 32,
  ) {}

  async use<T>(id: string, fn: (r: PackReader) => Promise<T>): Promise<T> {
    let slot = this.slots.get(id);
    if (slot) {
      this.slots.delete(id); // re-insert: Map order is the LRU order
    } else {
      slot = { reader: PackReader.open(join(this.packsDir, packRelPath(id)), id), users: 0 };
    }
    this.slots.set(id, slot);
    slot.users++;
    try {
      return await fn(await slot.reader);
    } catch (e) {
      // A pack that failed to open may appear later (crash recovery): retry next time.
      if (this.slots.get(id) === slot && (await slot.reader.then(() => false, () => true))) this.slots.delete(id);
      throw e;
    } finally {
      slot.users--;
      this.evict();
    }
  }

  /** Closes `id`'s handle once its users are done (GC removed the pack; an open fd would keep its space). */
  async forget(id: string): Promise<void> {
    const slot = this.slots.get(id);
    if (!slot) return;
    this.slots.delete(id);
    const r = await slot.reader.catch(() => undefined);
    if (!r) return;
    // A user still reading finishes on its own handle; close after it (polling is cheap and rare).
    while (slot.users > 0) await new Promise((res) => setTimeout(res, 5));
    await r.close().catch(() => undefined);
  }

  async close(): Promise<void> {
    const slots = [...this.slots.values()];
    this.slots.clear();
    await Promise.all(slots.map((s) => s.reader.then((r) => r.close()).catch(() => undefined)));
  }

  private evict(): void {
    if (this.slots.size <= this.capacity) return;
    for (const [id, slot] of this.slots) {
      if (this.slots.size <= this.capacity) break;
      if (slot.users > 0) continue;
      this.slots.delete(id);
      slot.reader.then((r) => r.close()).catch(() => undefined);
    }
  }
}
