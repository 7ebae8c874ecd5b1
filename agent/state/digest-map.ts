/**
 * Agent digest map (DESIGN.md §3.5): the chunk digests of a volume's last
 * committed image, `STATE/volumes/<volume>.digests`, so an incremental can
 * compare a snapshot without a trusted tracker.
 *
 * ```
 * 0   8   magic "BSNDMAP\0"
 * 8   2   version = 1
 * 10  2   reserved = 0
 * 12  4   chunk size (u32)
 * 16  8   volume size (u64)
 * 24  8   chunk count N (u64) = ceil(volume size / chunk size)
 * 32  64  image id, ASCII, NUL padded
 * 96  32  SHA-256 of the N*32 digest bytes
 * 128 32*N digests (ZERO for all-zero chunks)
 * ```
 *
 * The digests live in one Buffer of N*32 bytes (512 MiB for 1 TiB at 64 KiB
 * chunks): an array of per-chunk Buffers would cost several times that.
 * A file that fails any check is not trusted: the next job is a full.
 */
import { createHash } from 'node:crypto';
import { constants as bufferConstants } from 'node:buffer';
import { promises as fs } from 'node:fs';
import path from 'node:path';
import { BlocksnapError, isBlocksnapError } from '../../proto/errors.js';
import { writeDurable } from '../../proto/shared/durable-file.js';
import { assertChunkSize, chunkCountOf } from '../../proto/shared/volume-geometry.js';

export const DMAP_MAGIC: Buffer = Buffer.from('BSNDMAP\0', 'latin1');
export const DMAP_VERSION = 1;
export const DMAP_HEADER_BYTES = 128;
export const DMAP_IMAGE_ID_BYTES = 64;
const DIGEST = 32;
const IO_SLICE = 8 * 1024 * 1024;
const IMAGE_ID_RE = /^[\x21-\x7e]{1,64}$/;

/** Where the agent keeps the digest map of a volume's last committed image. */
export function digestMapPath(stateDir: string, volume: string): string {
  return path.join(stateDir, 'volumes', `${volume}.digests`);
}

export interface DigestMapInit {
  volumeSize: number;
  chunkSize: number;
  imageId: string;
  /** N*32 bytes or N digests; omitted = every chunk ZERO. Copied. */
  digests?: Buffer | readonly Buffer[];
}

function bad(message: string): BlocksnapError {
  return new BlocksnapError('E_FORMAT', `digest map: ${message}`);
}

function mapChunkCount(volumeSize: number, chunkSize: number): number {
  assertChunkSize(chunkSize, 'E_FORMAT', 'digest map: chunk size');
  if (!Number.isSafeInteger(volumeSize) || volumeSize <= 0) throw bad(`volume size ${volumeSize}`);
  const n = chunkCountOf(volumeSize, chunkSize);
  if (n * DIGEST > bufferConstants.MAX_LENGTH) throw bad(`${n} chunks do not fit one buffer`);
  return n;
}

function checkImageId(id: string): void {
  if (!IMAGE_ID_RE.test(id)) throw bad(`image id ${JSON.stringify(id)} is not 1..64 printable ASCII`);
}

export class DigestMap {
  private constructor(
    readonly volumeSize: number,
    readonly chunkSize: number,
    readonly chunkCount: number,
    private id: string,
    private readonly digests: Buffer,
  ) {}

  static create(init: DigestMapInit): DigestMap {
    const n = mapChunkCount(init.volumeSize, init.chunkSize);
    checkImageId(init.imageId);
    const buf = Buffer.alloc(n * DIGEST);
    const src = init.digests;
    if (Buffer.isBuffer(src)) {
      if (src.length !== buf.length) throw bad(`${src.length} digest bytes for ${n} chunks`);
      src.copy(buf);
    } else if (src) {
      if (src.length !== n) throw bad(`${src.length} digests for ${n} chunks`);
      src.forEach((d, i) => {
        if (d.length !== DIGEST) throw bad(`digest ${i} is ${d.length} bytes`);
        d.copy(buf, i * DIGEST);
      });
    }
    return new DigestMap(init.volumeSize, init.chunkSize, n, init.imageId, buf);
  }

  /** Parse a header; returns the geometry and expected checksum. */
  private static parseHeader(h: Buffer, fileSize: number) {
    if (fileSize < DMAP_HEADER_BYTES || h.length < DMAP_HEADER_BYTES) throw bad(`${fileSize} bytes is shorter than the header`);
    if (!h.subarray(0, 8).equals(DMAP_MAGIC)) throw bad('bad magic');
    const version = h.readUInt16LE(8);
    if (version !== DMAP_VERSION) throw bad(`unsupported version ${version}`);
    if (h.readUInt16LE(10) !== 0) throw bad('reserved field is not zero');
    const chunkSize = h.readUInt32LE(12);
    const volume = h.readBigUInt64LE(16);
    if (volume > BigInt(Number.MAX_SAFE_INTEGER)) throw bad(`volume size ${volume}`);
    const volumeSize = Number(volume);
    const n = mapChunkCount(volumeSize, chunkSize);
    if (h.readBigUInt64LE(24) !== BigInt(n)) throw bad(`chunk count ${h.readBigUInt64LE(24)} != ${n}`);
    const idField = h.subarray(32, 32 + DMAP_IMAGE_ID_BYTES);
    const nul = idField.indexOf(0);
    const idLen = nul < 0 ? DMAP_IMAGE_ID_BYTES : nul;
    if (idField.subarray(idLen).some((b) => b !== 0)) throw bad('image id is not NUL padded');
    const imageId = idField.subarray(0, idLen).toString('latin1');
    checkImageId(imageId);
    if (fileSize !== DMAP_HEADER_BYTES + n * DIGEST) throw bad(`size ${fileSize} != ${DMAP_HEADER_BYTES + n * DIGEST}`);
    return { volumeSize, chunkSize, n, imageId, checksum: Buffer.from(h.subarray(96, 128)) };
  }

  private static verified(h: ReturnType<typeof DigestMap.parseHeader>, digests: Buffer): DigestMap {
    if (!createHash('sha256').update(digests).digest().equals(h.checksum)) throw bad('checksum mismatch');
    return new DigestMap(h.volumeSize, h.chunkSize, h.n, h.imageId, digests);
  }

  /** Decode a whole file image (throws E_FORMAT). */
  static decode(file: Buffer): DigestMap {
    const h = DigestMap.parseHeader(file, file.length);
    return DigestMap.verified(h, Buffer.from(file.subarray(DMAP_HEADER_BYTES)));
  }

  /** Read and check a map file: E_NOT_FOUND if absent, E_FORMAT if it fails a check. */
  static async read(file: string): Promise<DigestMap> {
    let fh: fs.FileHandle;
    try {
      fh = await fs.open(file, 'r');
    } catch (e) {
      const code = (e as NodeJS.ErrnoException).code === 'ENOENT' ? 'E_NOT_FOUND' : 'E_INTERNAL';
      throw new BlocksnapError(code, `digest map ${file}: ${(e as Error).message}`, { cause: e });
    }
    try {
      const { size } = await fh.stat();
      const header = Buffer.alloc(DMAP_HEADER_BYTES);
      await readFully(fh, header, 0);
      const h = DigestMap.parseHeader(header, size);
      const digests = Buffer.allocUnsafe(h.n * DIGEST);
      await readFully(fh, digests, DMAP_HEADER_BYTES);
      return DigestMap.verified(h, digests);
    } catch (e) {
      if (isBlocksnapError(e)) throw e;
      throw new BlocksnapError('E_INTERNAL', `digest map ${file}: ${(e as Error).message}`, { cause: e });
    } finally {
      await fh.close();
    }
  }

  /** The map, or null when there is none or it cannot be trusted (→ full). */
  static async readIfValid(file: string): Promise<DigestMap | null> {
    try {
      return await DigestMap.read(file);
    } catch (e) {
      if (isBlocksnapError(e, 'E_NOT_FOUND') || isBlocksnapError(e, 'E_FORMAT')) return null;
      throw e;
    }
  }

  get imageId(): string {
    return this.id;
  }

  /** The image this map now describes (set once the appliance committed it). */
  setImageId(id: string): void {
    checkImageId(id);
    this.id = id;
  }

  /** Digest of chunk i: a view, valid as long as the map; do not mutate. */
  get(i: number): Buffer {
    this.checkIndex(i);
    return this.digests.subarray(i * DIGEST, (i + 1) * DIGEST);
  }

  set(i: number, digest: Buffer): void {
    this.checkIndex(i);
    if (digest.length !== DIGEST) throw bad(`digest is ${digest.length} bytes`);
    digest.copy(this.digests, i * DIGEST);
  }

  /** The N*32 digest bytes (read-only view). */
  bytes(): Buffer {
    return this.digests;
  }

  copy(): DigestMap {
    return new DigestMap(this.volumeSize, this.chunkSize, this.chunkCount, this.id, Buffer.from(this.digests));
  }

  encodeHeader(): Buffer {
    const h = Buffer.alloc(DMAP_HEADER_BYTES);
    DMAP_MAGIC.copy(h, 0);
    h.writeUInt16LE(DMAP_VERSION, 8);
    h.writeUInt32LE(this.chunkSize, 12);
    h.writeBigUInt64LE(BigInt(this.volumeSize), 16);
    h.writeBigUInt64LE(BigInt(this.chunkCount), 24);
    h.write(this.id, 32, DMAP_IMAGE_ID_BYTES, 'latin1');
    createHash('sha256').update(this.digests).digest().copy(h, 96);
    return h;
  }

  /** Whole file in one buffer: for small maps and tests; `write` streams. */
  encode(): Buffer {
    return Buffer.concat([this.encodeHeader(), this.digests]);
  }

  /** The durable write (proto/shared/durable-file), streamed: the digests are not copied into one buffer. */
  async write(file: string): Promise<void> {
    try {
      await writeDurable(file, async (fh) => {
        await writeFully(fh, this.encodeHeader(), 0);
        await writeFully(fh, this.digests, DMAP_HEADER_BYTES);
      });
    } catch (e) {
      throw new BlocksnapError('E_INTERNAL', `digest map ${file}: write failed: ${(e as Error).message}`, { cause: e });
    }
  }

  private checkIndex(i: number): void {
    if (!Number.isSafeInteger(i) || i < 0 || i >= this.chunkCount) {
      throw new BlocksnapError('E_CHUNK_RANGE', `chunk ${i} outside 0..${this.chunkCount - 1}`);
    }
  }
}

async function readFully(fh: fs.FileHandle, buf: Buffer, position: number): Promise<void> {
  for (let off = 0; off < buf.length; ) {
    const { bytesRead } = await fh.read(buf, off, Math.min(IO_SLICE, buf.length - off), position + off);
    if (bytesRead === 0) throw bad('file is shorter than its header says');
    off += bytesRead;
  }
}

async function writeFully(fh: fs.FileHandle, buf: Buffer, position: number): Promise<void> {
  for (let off = 0; off < buf.length; ) {
    const { bytesWritten } = await fh.write(buf, off, Math.min(IO_SLICE, buf.length - off), position + off);
    off += bytesWritten;
  }
}

