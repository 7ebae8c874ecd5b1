import { describe, expect, it } from 'vitest';
import { RESTORE_BATCH_PLAIN_BYTES, RESTORE_WORKER_KEEP_BYTES } from '../../proto/shared/restore-protocol.js';
import { MAX_CHUNK_SIZE } from '../../proto/shared/volume-geometry.js';

describe('restore batch limits', () => {
  // A batch closes after the chunk that reaches the plain cap, so it holds at most
  // the cap plus one chunk; the agent's worker must keep that much, or it
  // decompresses the batch a second time (the defect 28d98eb fixed).
  it("a batch's plain bytes (cap + one largest chunk) fit in what a restore worker keeps", () => {
    expect(RESTORE_BATCH_PLAIN_BYTES + MAX_CHUNK_SIZE).toBeLessThanOrEqual(RESTORE_WORKER_KEEP_BYTES);
  });
});
