import { createHash } from 'node:crypto';
import { WAL_PIECE_BYTES, type WalPiece } from '../../proto/messages.js';
import { zstdCompress } from '../../proto/shared/zstd.js';

/**
 * A WAL segment as the pieces the protocol carries (DESIGN.md §4.2): cut at
 * WAL_PIECE_BYTES, each compressed and named by the SHA-256 of its plain
 * bytes, so the appliance verifies and stores it like a chunk.
 */
export function* walPieces(jobId: string, seg: { name: string; data: Buffer }): Generator<WalPiece> {
  for (let off = 0; off < seg.data.length; off += WAL_PIECE_BYTES) {
    const plain = seg.data.subarray(off, Math.min(seg.data.length, off + WAL_PIECE_BYTES));
    yield {
      jobId, fileName: seg.name, offset: off, data: zstdCompress(plain), plainLength: plain.length,
      digest: createHash('sha256').update(plain).digest(), fileSize: seg.data.length,
    };
  }
}
