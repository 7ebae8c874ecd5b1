import { createHash } from 'node:crypto';
import { mkdir, open, rm } from 'node:fs/promises';
import { join } from 'node:path';
import { fsyncDir } from '../../proto/shared/durable-file.js';
import type { ChunkStore } from '../store/chunk-store.js';
import type { PgImageInfo } from '../store/pg-image-info.js';
import { SIDECAR_FORMAT, SIDECAR_VERSION, WAL_MARKER, WAL_MARKER_FORMAT, type PgSidecar } from '../../proto/shared/pg-sidecar.js';

export { sidecarPath, walDirPath, type PgSidecar } from '../../proto/shared/pg-sidecar.js';

/**
 * What `blocksnap-agent prepare` needs to start PostgreSQL on an exported
 * image FILE, written next to it: `FILE.blocksnap.json` (the sidecar, format
 * in proto/shared/pg-sidecar.ts) and `FILE.wal/<segment>` (the WAL from the
 * backup start to its stop LSN, read back from the store and re-hashed),
 * plus `FILE.wal/.blocksnap-wal` (the marker that makes the directory
 * blocksnap's to replace). The sidecar names the image (id, geometry, root
 * digest) and the file written with it (inode), so `prepare` can refuse to
 * apply it to anything else. export-image.ts decides the order of writes.
 */

/**
 * Writes the image's WAL segments into `dir` (created here; the caller
 * renames it into place), each fsync'ed, with blocksnap's marker. Returns
 * name, size and SHA-256 of each segment for the sidecar.
 */
export async function writeWalDir(store: ChunkStore, imageId: string, pg: PgImageInfo, dir: string): Promise<PgSidecar['wal']> {
  await mkdir(dir, { mode: 0o700 });
  const out: PgSidecar['wal'] = [];
  for (const f of pg.wal) {
    const fh = await open(join(dir, f.name), 'wx', 0o600);
    const hash = createHash('sha256');
    try {
      await fh.truncate(f.size);
      // Pieces cover the file in order (validatePgInfo): hash as we go.
      for (const p of f.pieces) {
        if (/^0+$/.test(p.digest)) {
          hash.update(Buffer.alloc(p.length)); // an all-zero piece: the truncate left zeros
          continue;
        }
        const plain = await store.get(Buffer.from(p.digest, 'hex'));
        hash.update(plain);
        await fh.write(plain, 0, plain.length, p.offset);
      }
      await fh.sync();
    } finally {
      await fh.close();
    }
    out.push({ name: f.name, size: f.size, sha256: hash.digest('hex') });
  }
  const marker = await open(join(dir, WAL_MARKER), 'wx', 0o600);
  try {
    await marker.writeFile(JSON.stringify({ format: WAL_MARKER_FORMAT, imageId }) + '\n');
    await marker.sync();
  } finally {
    await marker.close();
  }
  await fsyncDir(dir);
  return out;
}

export function buildSidecar(
  imageId: string, image: PgSidecar['image'], exportFile: PgSidecar['exportFile'], wal: PgSidecar['wal'], pg: PgImageInfo,
): PgSidecar {
  const { wal: _pieces, ...rest } = pg;
  return { format: SIDECAR_FORMAT, version: SIDECAR_VERSION, imageId, image, exportFile, wal, pg: rest };
}

/** Removes a directory blocksnap created (temp or moved-aside WAL dir); never called on anything else. */
export async function removeOwnDir(dir: string): Promise<void> {
  await rm(dir, { recursive: true, force: true });
}
