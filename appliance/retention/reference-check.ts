/**
 * The seal's last line of defence against a sweep (DESIGN.md §12.3): when a
 * GC swept index rows while an ingest ran, the ingest proves, before its
 * image can be committed, that every blob its map names is still in the
 * store. The sweep protocol already keeps every blob a running writer
 * de-duplicated against; this catches what no put ever touched (a basis page
 * or chunk carried over unchanged), so a mistake anywhere fails the job
 * cleanly instead of committing a dangling reference.
 */
import { BlocksnapError } from '../../proto/errors.js';
import { ZERO_DIGEST, type ChunkStore } from '../store/chunk-store.js';
import { ImageIndexReader } from '../store/image-index.js';
import { DIGEST_BYTES } from '../../proto/shared/image-root.js';

/** Throws E_INTEGRITY naming the first blob of the map rooted at `root` that the store does not hold. */
export async function assertReferencesPresent(store: ChunkStore, root: Buffer, what: string): Promise<void> {
  const missing = (d: Buffer, kind: string) =>
    new BlocksnapError('E_INTEGRITY', `${what}: ${kind} ${d.toString('hex')} was garbage-collected while the job ran; nothing was committed (run the backup again)`);
  if (!store.has(root)) throw missing(root, 'root');
  const reader = await ImageIndexReader.open(store, root);
  for (let p = 0; p < reader.pageCount; p++) {
    const pd = reader.pageDigest(p);
    if (pd.equals(ZERO_DIGEST)) continue;
    if (!store.has(pd)) throw missing(pd, `index page ${p}`);
    const page = await reader.loadPage(p);
    if (!page) continue;
    for (let s = 0; s < page.length; s += DIGEST_BYTES) {
      const d = page.subarray(s, s + DIGEST_BYTES);
      if (d.equals(ZERO_DIGEST)) continue;
      if (!store.has(d)) throw missing(Buffer.from(d), `chunk ${p * 1024 + s / DIGEST_BYTES}`);
    }
  }
}
