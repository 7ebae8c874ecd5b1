/**
 * Several blobs read on the calling thread with one pread per run of
 * adjacent frames in one pack (FsChunkStore.getMany without read workers:
 * the NBD read path). A 256 KiB NBD read is 4 chunks that lie back to back
 * in a pack; reading them one by one cost 4 thread-pool round trips, 4
 * buffers and 4 promise chains per request, which measured as a large part
 * of the server's CPU per chunk (README Benchmarks, NBD export).
 *
 * Every blob is still decoded and re-hashed (decodeBlob). Anything that fails
 * here — a damaged frame, a pack GC rewrote under the read, an I/O error —
 * is read again with `get`, which retries a moved blob and names pack and
 * digest in its error: the batching never changes what a caller sees.
 */
import type { BlobLocation } from './chunk-store.js';
import { decodeBlob } from './pack-reader.js';

export interface RunReadableStore {
  locate(digest: Buffer): BlobLocation | undefined;
  /** Stored bytes of `pack` from `offset` on, back to back into `buffers`. */
  readStoredv(pack: string, offset: number, buffers: Uint8Array[]): Promise<void>;
  get(digest: Buffer): Promise<Buffer>;
}

/**
 * A run is cut at this many stored bytes (one buffer per run; a run always
 * takes its first blob). The plain blobs returned are views of the run's
 * buffer, and ImageSource's LRU keeps such views: a cached 64 KiB chunk pins
 * at most this much, so the cache's memory stays within 4× its budget. An
 * NBD read of nbdcopy (256 KiB, 4 chunks) is one run.
 */
export const MAX_RUN_BYTES = 256 * 1024;

interface Item { k: number; loc: BlobLocation }

/** Plain bytes of each digest, in order; equal to `digests.map(get)`. */
export function readBlobRuns(store: RunReadableStore, digests: Buffer[]): Promise<Buffer[]> {
  const out = new Array<Promise<Buffer> | Buffer>(digests.length);
  const byPack = new Map<string, Item[]>();
  for (let k = 0; k < digests.length; k++) {
    const loc = store.locate(digests[k]!);
    if (!loc) {
      out[k] = handled(store.get(digests[k]!)); // E_NOT_FOUND, worded as get() does
      continue;
    }
    let g = byPack.get(loc.pack);
    if (!g) byPack.set(loc.pack, (g = []));
    g.push({ k, loc });
  }
  const runs: Promise<void>[] = [];
  for (const [pack, group] of byPack) {
    if (group.length > 1) group.sort((a, b) => a.loc.offset - b.loc.offset);
    for (let i = 0; i < group.length;) {
      const start = group[i]!.loc.offset;
      let end = start + group[i]!.loc.storedLength;
      let j = i + 1;
      for (; j < group.length; j++) {
        const l = group[j]!.loc;
        if (l.offset !== end || l.offset + l.storedLength - start > MAX_RUN_BYTES) break;
        end += l.storedLength;
      }
      runs.push(readRun(store, pack, group.slice(i, j), start, end - start, digests, out));
      i = j;
    }
  }
  return Promise.all(runs).then(() => Promise.all(out));
}

/** A rejection is reported by the final Promise.all, which attaches only after every run was read. */
function handled<T>(p: Promise<T>): Promise<T> {
  p.catch(() => undefined);
  return p;
}

async function readRun(
  store: RunReadableStore,
  pack: string,
  items: Item[],
  start: number,
  length: number,
  digests: Buffer[],
  out: Array<Promise<Buffer> | Buffer>,
): Promise<void> {
  const buf = Buffer.allocUnsafe(length);
  try {
    await store.readStoredv(pack, start, [buf]);
  } catch {
    for (const { k } of items) out[k] = handled(store.get(digests[k]!));
    return;
  }
  for (const { k, loc } of items) {
    const at = loc.offset - start;
    try {
      out[k] = decodeBlob(pack, digests[k]!, buf.subarray(at, at + loc.storedLength), loc);
    } catch {
      out[k] = handled(store.get(digests[k]!));
    }
  }
}
