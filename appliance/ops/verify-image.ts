import { toBlocksnapError } from '../../proto/errors.js';
import type { ChunkStore } from '../store/chunk-store.js';
import { ZERO_DIGEST } from '../store/chunk-store.js';
import { ImageIndexReader } from '../store/image-index.js';
import type { ManifestStore } from '../store/manifest-store.js';

export interface VerifyReport {
  imageId: string;
  ok: boolean;
  status: 'ok' | 'damaged';
  chunks: number;
  chunksChecked: number;
  chunksZero: number;
  bytesChecked: number;
  /** Chunks that do not read back (missing, corrupt), by index. */
  bad: { index: number; digest: string; code: string; message: string }[];
  /** Other objects of the image that are damaged: manifest, root, pages. */
  objects: { object: string; code: string; message: string }[];
  seconds: number;
}

/**
 * Re-reads and re-hashes every chunk an image references (the store's `get`
 * re-hashes on read) plus its manifest, root and pages, and names every bad
 * object instead of stopping at the first: a missing or unreadable manifest,
 * root or page is reported and the rest is still checked (a page that cannot
 * be read hides its 1024 chunks, which are then not counted as checked).
 * Never throws for damage: the report says `damaged`. A chunk shared by
 * several slots is read once.
 */
export async function verifyImage(
  store: ChunkStore, manifests: ManifestStore, imageId: string, rootDigestHex: string,
  onProgress?: (done: number, total: number) => void,
): Promise<VerifyReport> {
  const started = performance.now();
  const report: VerifyReport = {
    imageId, ok: true, status: 'ok', chunks: 0, chunksChecked: 0, chunksZero: 0, bytesChecked: 0, bad: [], objects: [], seconds: 0,
  };
  const problem = (object: string, e: unknown) => {
    const err = toBlocksnapError(e, 'E_STORE_CORRUPT');
    report.objects.push({ object, code: err.code, message: err.message });
  };
  const finish = () => {
    report.ok = report.bad.length === 0 && report.objects.length === 0;
    report.status = report.ok ? 'ok' : 'damaged';
    report.seconds = (performance.now() - started) / 1000;
    return report;
  };
  let root = rootDigestHex;
  try {
    const m = await manifests.get(imageId);
    if (!root) root = m.rootDigest;
    else if (m.rootDigest !== root) problem(`manifest ${imageId}`, new Error(`manifest root ${m.rootDigest} differs from the catalog's ${root}`));
  } catch (e) {
    problem(`manifest ${imageId}`, e);
  }
  if (!root) return finish();
  let reader: ImageIndexReader;
  try {
    reader = await ImageIndexReader.open(store, Buffer.from(root, 'hex'));
  } catch (e) {
    problem(`root ${root}`, e);
    return finish();
  }
  report.chunks = reader.chunkCount;
  const seen = new Map<string, string | null>();
  let done = 0;
  for (let p = 0; p < reader.pageCount; p++) {
    const firstIndex = p * 1024;
    const n = Math.min(1024, reader.chunkCount - firstIndex);
    let digests: Buffer | null;
    try {
      digests = await reader.loadPage(p);
    } catch (e) {
      problem(`page ${p} ${reader.pageDigest(p).toString('hex')} (chunks ${firstIndex}..${firstIndex + n - 1})`, e);
      done += n;
      onProgress?.(done, reader.chunkCount);
      continue;
    }
    for (let s = 0; s < n; s++) {
      const index = firstIndex + s;
      const digest = digests ? digests.subarray(s * 32, s * 32 + 32) : ZERO_DIGEST;
      if (digest.equals(ZERO_DIGEST)) {
        report.chunksZero++;
        continue;
      }
      const hex = digest.toString('hex');
      let bad = seen.get(hex);
      if (bad === undefined) {
        try {
          const plain = await store.get(Buffer.from(digest));
          report.bytesChecked += plain.length;
          bad = null;
        } catch (e) {
          const err = toBlocksnapError(e, 'E_STORE_CORRUPT');
          bad = `${err.code}\t${err.message}`;
        }
        seen.set(hex, bad);
        report.chunksChecked++;
      }
      if (bad) {
        const [code, message] = bad.split('\t') as [string, string];
        report.bad.push({ index, digest: hex, code, message });
      }
    }
    done += n;
    onProgress?.(done, reader.chunkCount);
  }
  return finish();
}
