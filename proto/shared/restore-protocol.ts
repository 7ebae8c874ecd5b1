/**
 * Restore over the agent's session (DESIGN.md §4.6): the bounds both sides
 * hold and the field-shape checks of the restore messages (Envelope fields
 * 50-55). The state machines live in agent/restore/ and appliance/restore/.
 *
 *   agent                                   appliance
 *   ── RestoreRequest{id, image} ─────────▶  own image of this agent? else RestoreEnd{!ok}
 *   ◀── RestoreMap{geometry, root, pages}×N, the last with last=true
 *   agent checks the map against the root, decides what it needs
 *   ── RestoreWant{ranges}×M (last=true) ─▶  every range inside the image, increasing
 *   ◀── RestoreChunks{seq, chunks} ───────   ≤ RESTORE_WINDOW_BYTES unacknowledged
 *   ── RestoreAck{seq} ───────────────────▶  (after the batch is written)
 *   ── RestoreEnd{ok | code} ─────────────▶  either side may end it with a code
 */
import { BlocksnapError } from '../errors.js';
import type { Envelope } from '../messages.js';
import { PAGE_BYTES, SLOTS_PER_PAGE } from './image-root.js';

/** Map pages per RestoreMap: 64 × 32 KiB = 2 MiB, well under the 8 MiB frame limit. */
export const RESTORE_MAP_PAGES = 64;
/** Ranges per RestoreWant (16 bytes each at most: far under a frame). */
export const RESTORE_MAX_RANGES = 4096;
/** Chunk bytes (compressed data + RESTORE_CHUNK_OVERHEAD each) the appliance keeps unacknowledged per restore. */
export const RESTORE_WINDOW_BYTES = 32 << 20;
/** A RestoreChunks batch closes at about this many bytes (one chunk over at most). */
export const RESTORE_BATCH_BYTES = 2 << 20;
/**
 * …and at about this many plain bytes (one chunk over at most): a worker of the agent keeps a batch's
 * decompressed bytes between its digest check and its write only up to 64 MiB (else it decompresses
 * the batch a second time); 2 MiB of pgbench frames held ~35 MiB plain on average, up to 70 MiB.
 */
export const RESTORE_BATCH_PLAIN_BYTES = 16 << 20;
/**
 * Plain bytes of one batch an agent's restore worker keeps between its digest check and its write
 * (agent/restore/restore-worker.ts). Must hold a whole batch of RESTORE_BATCH_PLAIN_BYTES plus the one
 * chunk that may go over (test/proto/restore-batch-limits.test.ts pins it).
 */
export const RESTORE_WORKER_KEEP_BYTES = 64 << 20;
export const RESTORE_CHUNK_OVERHEAD = 64;
/** Restores one agent may run at once (each holds a map and a window). */
export const RESTORE_MAX_PER_AGENT = 4;
export const REQUEST_ID_RE = /^rst-[0-9a-f]{8,64}$/;

function fail(msg: string): never {
  throw new BlocksnapError('E_PROTOCOL', msg);
}

/** Shape checks (codec.ts validateEnvelope delegates here); semantic checks stay with the receiver. */
export function validateRestoreMessage(env: Envelope): void {
  switch (env.kind) {
    case 'restoreRequest':
      requestId(env.restoreRequest.requestId, 'restoreRequest');
      if (!env.restoreRequest.imageId || env.restoreRequest.imageId.length > 128) fail('restoreRequest.imageId must be 1..128 characters');
      return;
    case 'restoreMap': {
      const m = env.restoreMap;
      requestId(m.requestId, 'restoreMap');
      if (m.rootDigest.length !== 32) fail('restoreMap.rootDigest must be 32 bytes');
      if (m.firstIndex % SLOTS_PER_PAGE !== 0) fail('restoreMap.firstIndex is not a page boundary');
      if (m.digests.length % 32 !== 0 || m.digests.length > RESTORE_MAP_PAGES * PAGE_BYTES) {
        fail(`restoreMap.digests must be whole digests, at most ${RESTORE_MAP_PAGES} pages`);
      }
      if (m.imageId.length > 128 || m.volume.length > 256) fail('restoreMap: image id or volume too long');
      return;
    }
    case 'restoreWant': {
      const m = env.restoreWant;
      requestId(m.requestId, 'restoreWant');
      if (m.ranges.length > RESTORE_MAX_RANGES) fail(`restoreWant has more than ${RESTORE_MAX_RANGES} ranges`);
      let end = -1;
      for (const r of m.ranges) {
        if (r.count < 1) fail('restoreWant: an empty range');
        if (r.first < end) fail('restoreWant: ranges are not increasing and disjoint');
        end = r.first + r.count;
        if (!Number.isSafeInteger(end)) fail('restoreWant: range end out of range');
      }
      return;
    }
    case 'restoreAck':
      requestId(env.restoreAck.requestId, 'restoreAck');
      return;
    case 'restoreEnd': {
      const m = env.restoreEnd;
      requestId(m.requestId, 'restoreEnd');
      if (!m.ok && !/^E_[A-Z0-9_]{1,62}$/.test(m.code)) fail('restoreEnd.code is not an error code');
      if (m.message.length > 4096) fail('restoreEnd.message is longer than 4096 characters');
      return;
    }
    default:
      return;
  }
}

function requestId(v: string, what: string): void {
  if (!REQUEST_ID_RE.test(v)) fail(`${what}.requestId is not a restore request id`);
}
