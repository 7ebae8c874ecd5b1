import { mkdir, open, rm } from 'node:fs/promises';
import { join } from 'node:path';
import { writeFileDurably } from '../../proto/durable-file.js';
import type { ChunkStore } from '../store/chunk-store.js';
import type { PgImageInfo } from '../store/pg-image-info.js';

/**
 * Next to an exported image FILE, writes what `blocksnap-agent prepare`
 * needs to start PostgreSQL on it: `FILE.blocksnap.json` (image id, label,
 * tablespace map, LSNs, timeline, server version) and `FILE.wal/<segment>`
 * (the WAL from the backup start to its stop LSN, read back from the store
 * and re-hashed).
 */
export interface PgSidecar {
  format: 'blocksnap-pg-sidecar';
  version: 1;
  imageId: string;
  pg: Omit<PgImageInfo, 'wal'> & { walFiles: string[] };
}

export const sidecarPath = (file: string) => `${file}.blocksnap.json`;
export const walDirPath = (file: string) => `${file}.wal`;

export async function exportPgSidecar(store: ChunkStore, imageId: string, pg: PgImageInfo, file: string): Promise<PgSidecar> {
  const walDir = walDirPath(file);
  await rm(walDir, { recursive: true, force: true });
  await mkdir(walDir, { recursive: true });
  for (const f of pg.wal) {
    const fh = await open(join(walDir, f.name), 'wx', 0o600);
    try {
      await fh.truncate(f.size);
      for (const p of f.pieces) {
        if (/^0+$/.test(p.digest)) continue; // an all-zero piece: the truncate left zeros
        const plain = await store.get(Buffer.from(p.digest, 'hex'));
        await fh.write(plain, 0, plain.length, p.offset);
      }
      await fh.sync();
    } finally {
      await fh.close();
    }
  }
  const { wal, ...rest } = pg;
  const sidecar: PgSidecar = { format: 'blocksnap-pg-sidecar', version: 1, imageId, pg: { ...rest, walFiles: wal.map((w) => w.name) } };
  await writeFileDurably(sidecarPath(file), Buffer.from(JSON.stringify(sidecar, null, 2) + '\n'));
  return sidecar;
}
