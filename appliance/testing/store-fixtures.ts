/**
 * Test helpers for the chunk store: temp directories that are always removed,
 * and blob generators (random = incompressible, text-like = compressible,
 * zero) with their digest and, like the agent sends them, a zstd frame.
 */
import { createHash, randomBytes } from 'node:crypto';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { BlobType } from '../store/chunk-store.js';
import { zstdCompress } from '../../proto/shared/zstd.js';

export interface TestBlob {
  type: BlobType;
  digest: Buffer;
  plain: Buffer;
  /** A zstd frame of `plain`, as the agent would send it. */
  compressed: Buffer;
}

export function sha256(buf: Uint8Array): Buffer {
  return createHash('sha256').update(buf).digest();
}

export function randomChunk(size: number): Buffer {
  return randomBytes(size);
}

export function zeroChunk(size: number): Buffer {
  return Buffer.alloc(size);
}

/** Compressible but unique: a random header then repeated text, like a database page. */
export function compressibleChunk(size: number): Buffer {
  const buf = Buffer.alloc(size, 'row data for the blocksnap test; ');
  randomBytes(Math.min(32, size)).copy(buf, 0);
  return buf;
}

export function makeBlob(plain: Buffer, type: BlobType = 1): TestBlob {
  return { type, digest: sha256(plain), plain, compressed: zstdCompress(plain) };
}

/** Tracks temp directories so a test's afterEach removes exactly what it made. */
export class TempDirs {
  private readonly dirs: string[] = [];

  async make(prefix = 'blocksnap-store-'): Promise<string> {
    const dir = await mkdtemp(join(tmpdir(), prefix));
    this.dirs.push(dir);
    return dir;
  }

  async cleanup(): Promise<void> {
    const dirs = this.dirs.splice(0);
    await Promise.all(dirs.map((d) => rm(d, { recursive: true, force: true })));
  }
}
