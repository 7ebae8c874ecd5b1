import { randomBytes } from 'node:crypto';
import { link, open, rename, rm, stat, unlink, type FileHandle } from 'node:fs/promises';
import { dirname, basename, join } from 'node:path';
import { fsyncDir, writeFileDurably } from '../../proto/shared/durable-file.js';
import { BlocksnapError } from '../../proto/errors.js';
import type { PgImageInfo } from '../store/pg-image-info.js';
import { buildSidecar, removeOwnDir, writeWalDir } from './export-pg.js';
import { checkExportTarget, recheckFile, type ExportTargetOptions } from './export-target.js';
import type { ChunkStore } from '../store/chunk-store.js';
import { ZERO_DIGEST } from '../store/chunk-store.js';
import { ImageIndexReader } from '../store/image-index.js';

export interface ExportReport {
  file: string;
  volumeSize: number;
  chunksWritten: number;
  chunksZero: number;
  bytesWritten: number;
  seconds: number;
}

/**
 * Writes an image's virtual full as a raw file: zero chunks are holes
 * (sparse), every other chunk is read from the store (re-hashed on read).
 * Crash-consistent only (no sidecar): `exportImageTo` with the image's
 * PostgreSQL info writes the sidecar too. Refuses an existing target.
 */
export async function exportImage(
  store: ChunkStore, rootDigestHex: string, file: string, onProgress?: (done: number, total: number) => void,
): Promise<ExportReport> {
  return exportImageTo(store, { id: '', rootDigest: rootDigestHex, pg: null }, file, { onProgress });
}

export interface ExportableImage {
  id: string;
  rootDigest: string;
  /** The image's PostgreSQL info (catalog pg_json): a sidecar and FILE.wal/ are written with the file. */
  pg?: PgImageInfo | Record<string, unknown> | null;
}

export interface ExportOptions extends ExportTargetOptions {
  onProgress?: (done: number, total: number) => void;
}

/**
 * `export --to FILE`: the target is checked before a byte is written
 * (export-target.ts), the image goes to a temp file in FILE's directory, and
 * only when it is complete and fsync'ed are the paths swapped, in an order
 * in which a stale sidecar never sits next to new data:
 *   1. an old FILE.blocksnap.json is unlinked, an old FILE.wal/ moved aside;
 *   2. the new file is installed: link(2) when nothing was there (never
 *      replaces what appeared meanwhile), rename(2) over a regular file
 *      with --force;
 *   3. for a PostgreSQL image, the new WAL directory is renamed into place
 *      and the sidecar, which names the installed file's inode, is written
 *      last (temp + fsync + rename): its presence means everything is there;
 *   4. the directory is fsync'ed, the moved-aside WAL removed.
 * A crash anywhere leaves no sidecar, or one that names this file; a failed
 * export leaves no temp file behind.
 */
export async function exportImageTo(store: ChunkStore, image: ExportableImage, file: string, o: ExportOptions = {}): Promise<ExportReport> {
  const started = performance.now();
  const target = await checkExportTarget(file, o);
  const pg = image.pg ? (image.pg as PgImageInfo) : null;
  const reader = await ImageIndexReader.open(store, Buffer.from(image.rootDigest, 'hex'));
  const dir = dirname(target.file);
  const tag = `blocksnap-export-${process.pid}-${randomBytes(4).toString('hex')}`;
  const tmp = join(dir, `.${basename(target.file)}.${tag}.tmp`);
  const tmpWal = join(dir, `.${basename(target.walDir)}.${tag}.tmp`);
  const oldWal = join(dir, `.${basename(target.walDir)}.${tag}.old`);
  const report: ExportReport = { file: target.file, volumeSize: reader.volumeSize, chunksWritten: 0, chunksZero: 0, bytesWritten: 0, seconds: 0 };
  let fh;
  try {
    fh = await open(tmp, 'wx', 0o600);
  } catch (e) {
    throw new BlocksnapError('E_STORE_IO', `cannot create ${tmp}: ${(e as Error).message}`, { cause: e });
  }
  let installed = false;
  try {
    await writeImage(store, reader, fh, report, o.onProgress);
    await fh.sync();
    await fh.close();
    fh = null;
    const wal = pg ? await writeWalDir(store, image.id, pg, tmpWal) : [];
    const st = await stat(tmp, { bigint: true });

    // Swap. From here on the old sidecar is gone before the new data is visible.
    if (target.existing.sidecar) await unlink(target.sidecar);
    if (target.existing.walDir) await rename(target.walDir, oldWal);
    if (target.existing.sidecar || target.existing.walDir) await fsyncDir(dir);
    await recheckFile(target, !!o.force);
    if (o.force) {
      await rename(tmp, target.file);
    } else {
      await link(tmp, target.file).catch((e: NodeJS.ErrnoException) => {
        if (e.code === 'EEXIST') throw new BlocksnapError('E_USAGE', `export target ${target.file}: something appeared there during the export; nothing was replaced`, { cause: e });
        throw e;
      });
      await unlink(tmp);
    }
    installed = true;
    if (pg) {
      await rename(tmpWal, target.walDir);
      const sidecar = buildSidecar(
        image.id,
        { rootDigest: image.rootDigest, volumeSize: reader.volumeSize, chunkSize: reader.chunkSize },
        { name: basename(target.file), ino: String(st.ino), birthtimeNs: String(st.birthtimeNs), size: Number(st.size) },
        wal, pg,
      );
      await writeFileDurably(target.sidecar, Buffer.from(JSON.stringify(sidecar, null, 2) + '\n'));
    }
    await fsyncDir(dir);
  } catch (e) {
    await fh?.close().catch(() => undefined);
    if (!installed) await rm(tmp, { force: true });
    await removeOwnDir(tmpWal);
    throw e;
  } finally {
    await removeOwnDir(oldWal);
  }
  report.seconds = (performance.now() - started) / 1000;
  return report;
}

async function writeImage(
  store: ChunkStore, reader: ImageIndexReader, fh: FileHandle, report: ExportReport, onProgress?: (done: number, total: number) => void,
): Promise<void> {
  await fh.truncate(reader.volumeSize);
  const cs = reader.chunkSize;
  let done = 0;
  for await (const page of reader.pages()) {
    const n = Math.min(1024, reader.chunkCount - page.firstIndex);
    if (page.digests) {
      // Fetch a few chunks ahead so store reads overlap file writes.
      const pending: Promise<void>[] = [];
      for (let s = 0; s < n; s++) {
        const digest = page.digests.subarray(s * 32, s * 32 + 32);
        if (digest.equals(ZERO_DIGEST)) {
          report.chunksZero++;
          continue;
        }
        const index = page.firstIndex + s;
        pending.push((async () => {
          const plain = await store.get(Buffer.from(digest));
          await fh.write(plain, 0, plain.length, index * cs);
          report.chunksWritten++;
          report.bytesWritten += plain.length;
        })());
        if (pending.length >= 16) await Promise.all(pending.splice(0));
      }
      await Promise.all(pending);
    } else {
      report.chunksZero += n;
    }
    done += n;
    onProgress?.(done, reader.chunkCount);
  }
}
