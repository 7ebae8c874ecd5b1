import { open, rename, rm } from 'node:fs/promises';
import { dirname, basename, join } from 'node:path';
import { BlocksnapError } from '../../proto/errors.js';
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
 * The file appears under its name only when complete and fsync'ed; a failed
 * export leaves no partial file behind.
 */
export async function exportImage(
  store: ChunkStore, rootDigestHex: string, file: string, onProgress?: (done: number, total: number) => void,
): Promise<ExportReport> {
  const started = performance.now();
  const reader = await ImageIndexReader.open(store, Buffer.from(rootDigestHex, 'hex'));
  const tmp = join(dirname(file), `.${basename(file)}.blocksnap-export-${process.pid}.tmp`);
  const report: ExportReport = { file, volumeSize: reader.volumeSize, chunksWritten: 0, chunksZero: 0, bytesWritten: 0, seconds: 0 };
  let fh;
  try {
    fh = await open(tmp, 'wx', 0o600);
  } catch (e) {
    throw new BlocksnapError('E_STORE_IO', `cannot create ${tmp}: ${(e as Error).message}`, { cause: e });
  }
  try {
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
    await fh.sync();
    await fh.close();
    fh = null;
    await rename(tmp, file);
    const dir = await open(dirname(file), 'r');
    await dir.sync().finally(() => dir.close());
  } catch (e) {
    await fh?.close().catch(() => undefined);
    await rm(tmp, { force: true });
    throw e;
  }
  report.seconds = (performance.now() - started) / 1000;
  return report;
}
