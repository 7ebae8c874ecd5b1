import { createHash, randomBytes } from 'node:crypto';
import { open, readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { digestDiffSet, indexesOf, setOfWords, unionOf } from '../../agent/restore/changed-set.js';
import { ChunkWriter } from '../../agent/restore/chunk-writer.js';
import { RestoreSession } from '../../agent/restore/restore-session.js';
import { zstdRawFrame } from '../../appliance/restore/zstd-raw-frame.js';
import { decodeSingleFrame, encodeFrame } from '../../proto/codec.js';
import { envelope, type Envelope } from '../../proto/messages.js';
import { imageRootDigest } from '../../proto/shared/image-root.js';
import { zstdCompress } from '../../proto/shared/zstd.js';
import { codeOf } from '../support/error-code.js';
import { tempDirEach } from '../support/temp-dir.js';

/**
 * The agent's side of the restore exchange against a lying appliance (a
 * scripted one: the frames are handed to the session directly): a map that
 * does not hash to its root, a geometry beyond the bound, pages out of
 * place; chunks that were not asked for, sent twice or with other bytes.
 */
const RID = 'rst-00000000000000aa';
const CS = 4096;

function mapMsg(o: { size: number; digests: Buffer; root: Buffer; first?: number; last?: boolean }): Envelope {
  return envelope('restoreMap', {
    requestId: RID, imageId: 'img-x', volume: 'vol', volumeSize: o.size, chunkSize: CS, rootDigest: o.root,
    firstIndex: o.first ?? 0, digests: o.digests, last: o.last ?? true,
  });
}

function volume(chunks: number) {
  const data = randomBytes(chunks * CS);
  const digests = Buffer.alloc(chunks * 32);
  for (let i = 0; i < chunks; i++) createHash('sha256').update(data.subarray(i * CS, (i + 1) * CS)).digest().copy(digests, i * 32);
  return { data, digests, root: imageRootDigest(chunks * CS, CS, digests) };
}

describe('RestoreSession against a lying appliance', () => {
  const sent: Envelope[] = [];
  const session = () => new RestoreSession(RID, async (e) => void sent.push(e), 1 << 20);

  it('accepts a map that hashes to its root', async () => {
    const v = volume(10);
    const s = session();
    s.deliver(mapMsg({ size: 10 * CS, digests: v.digests, root: v.root }));
    const m = await s.imageMap();
    expect(m.digests.equals(v.digests)).toBe(true);
  });

  it('refuses a map whose digests do not hash to the root: E_INTEGRITY', async () => {
    const v = volume(10);
    const lie = Buffer.from(v.digests);
    lie[5 * 32] ^= 1;
    const s = session();
    s.deliver(mapMsg({ size: 10 * CS, digests: lie, root: v.root }));
    expect(await codeOf(s.imageMap())).toBe('E_INTEGRITY');
  });

  it('refuses a geometry whose map is above the bound before allocating it, and pages past the end or going back', async () => {
    const s1 = session();
    s1.deliver(mapMsg({ size: 2 ** 50, digests: Buffer.alloc(0), root: Buffer.alloc(32, 1), last: false }));
    expect(await codeOf(s1.imageMap())).toBe('E_PROTOCOL');
    const v = volume(10);
    const s2 = session();
    s2.deliver(mapMsg({ size: 10 * CS, digests: Buffer.alloc(32 * 20, 1), root: v.root }));
    expect(await codeOf(s2.imageMap())).toBe('E_PROTOCOL');
    const s3 = session();
    const big = volume(3000);
    s3.deliver(mapMsg({ size: 3000 * CS, digests: big.digests.subarray(1024 * 32, 2048 * 32), root: big.root, first: 1024, last: false }));
    s3.deliver(mapMsg({ size: 3000 * CS, digests: big.digests.subarray(0, 1024 * 32), root: big.root, first: 0, last: false }));
    expect(await codeOf(s3.imageMap())).toBe('E_PROTOCOL');
  });

  it('refuses chunks before the map is complete, and an appliance that ends the restore with a code', async () => {
    const s = session();
    s.deliver(envelope('restoreChunks', { requestId: RID, seq: 1, chunks: [] }));
    expect(await codeOf(s.imageMap())).toBe('E_PROTOCOL');
    const s2 = session();
    s2.deliver(envelope('restoreEnd', { requestId: RID, ok: false, code: 'E_NOT_FOUND', message: 'no image' }));
    expect(await codeOf(s2.imageMap())).toBe('E_NOT_FOUND');
  });
});

// 0: checked and written on the main thread; 2: in the restore's worker threads (as the agent runs it).
// keepBytes 1 chunk: a worker decompresses the batch again while writing (the path of very compressible batches).
describe.each([{ workers: 0 }, { workers: 2 }, { workers: 1, keepBytes: 4096 }])('ChunkWriter %o', ({ workers, keepBytes }) => {
  const dir = tempDirEach('blocksnap-restore-');

  async function writerFor(chunks: number, wanted: (i: number) => boolean) {
    const v = volume(chunks);
    const file = join(dir.path, 'target');
    const fh = await open(file, 'w+');
    await fh.truncate(chunks * CS);
    return { v, file, fh, w: new ChunkWriter(fh, chunks * CS, CS, v.digests, wanted, chunks, workers, keepBytes) };
  }
  const chunk = (v: ReturnType<typeof volume>, i: number, data?: Buffer) => ({
    index: i, digest: v.digests.subarray(i * 32, (i + 1) * 32), zero: false, plainLength: CS,
    data: zstdCompress(data ?? v.data.subarray(i * CS, (i + 1) * CS)),
  });

  it('writes checked chunks at their offsets (runs coalesced)', async () => {
    const { v, file, fh, w } = await writerFor(8, () => true);
    await w.write({ requestId: RID, seq: 1, chunks: [0, 1, 2, 5, 7].map((i) => chunk(v, i)) });
    await w.close();
    await fh.close();
    const out = await readFile(file);
    for (const i of [0, 1, 2, 5, 7]) expect(out.subarray(i * CS, (i + 1) * CS).equals(v.data.subarray(i * CS, (i + 1) * CS))).toBe(true);
    expect(out.subarray(3 * CS, 4 * CS).equals(Buffer.alloc(CS))).toBe(true);
    expect(w.written).toBe(5);
  });

  it('refuses other bytes (E_DIGEST_MISMATCH, nothing of the batch written), unasked and repeated chunks (E_PROTOCOL)', async () => {
    const { v, file, fh, w } = await writerFor(8, (i) => i !== 6);
    const bad = Buffer.from(v.data.subarray(2 * CS, 3 * CS));
    bad[17] ^= 0x55;
    expect(await codeOf(w.write({ requestId: RID, seq: 1, chunks: [chunk(v, 1), chunk(v, 2, bad)] }))).toBe('E_DIGEST_MISMATCH');
    expect((await readFile(file)).subarray(CS, 2 * CS).equals(Buffer.alloc(CS))).toBe(true);
    expect(await codeOf(w.write({ requestId: RID, seq: 2, chunks: [chunk(v, 6)] }))).toBe('E_PROTOCOL');
    await w.write({ requestId: RID, seq: 3, chunks: [chunk(v, 0)] });
    expect(await codeOf(w.write({ requestId: RID, seq: 4, chunks: [chunk(v, 0)] }))).toBe('E_PROTOCOL');
    await w.close();
    await fh.close();
  });
});

// The batch as the agent receives it: decoded from a WebSocket message (a buffer of its own).
describe.each([{ workers: 0 }, { workers: 2 }])('ChunkWriter on received messages %o', ({ workers }) => {
  const dir = tempDirEach('blocksnap-restore-msg-');
  const CHUNKS = 6;

  async function setUp() {
    const v = volume(CHUNKS);
    const file = join(dir.path, 'target');
    const fh = await open(file, 'w+');
    await fh.truncate(CHUNKS * CS);
    return { v, file, fh, w: new ChunkWriter(fh, CHUNKS * CS, CS, v.digests, () => true, CHUNKS, workers) };
  }
  // Chunks 0-3 as raw-block frames (stored plain on the appliance), 4-5 compressed; one message.
  function frameOf(v: ReturnType<typeof volume>, indexes: number[], flip?: number): Buffer {
    const chunks = indexes.map((i) => {
      const plain = Buffer.from(v.data.subarray(i * CS, (i + 1) * CS));
      if (i === flip) plain[9] ^= 0x20;
      return { index: i, digest: v.digests.subarray(i * 32, (i + 1) * 32), zero: false, plainLength: CS, data: i < 4 ? zstdRawFrame(plain) : zstdCompress(Buffer.concat([plain.subarray(0, 64), Buffer.alloc(CS - 64)])) };
    });
    return encodeFrame(envelope('restoreChunks', { requestId: RID, seq: 1, chunks }));
  }
  const expected = (v: ReturnType<typeof volume>, i: number) => (i < 4 ? v.data.subarray(i * CS, (i + 1) * CS) : Buffer.concat([v.data.subarray(i * CS, i * CS + 64), Buffer.alloc(CS - 64)]));
  // Compressed chunks carry other bytes than the volume: their digests are those of what they hold.
  function fixDigests(v: ReturnType<typeof volume>) {
    for (const i of [4, 5]) createHash('sha256').update(expected(v, i)).digest().copy(v.digests, i * 32);
  }

  it('a batch that owns its message goes to a worker uncopied (the message is transferred) and is written byte-identical', async () => {
    const { v, file, fh, w } = await setUp();
    fixDigests(v);
    const message = Buffer.from(frameOf(v, [0, 1, 2, 4, 5])); // a buffer of its own, as ws hands over
    const env = decodeSingleFrame(message);
    if (env.kind !== 'restoreChunks') throw new Error(env.kind);
    await w.write(env.restoreChunks);
    await w.close();
    await fh.close();
    const out = await readFile(file);
    for (const i of [0, 1, 2, 4, 5]) expect(out.subarray(i * CS, (i + 1) * CS).equals(expected(v, i)), `chunk ${i}`).toBe(true);
    expect(out.subarray(3 * CS, 4 * CS).equals(Buffer.alloc(CS))).toBe(true);
    if (workers > 0) {
      expect(w.transferred).toBe(1);
      expect(message.buffer.byteLength).toBe(0); // detached: it went to the worker as it was
    } else {
      expect(message.buffer.byteLength).toBeGreaterThan(0);
    }
  });

  it('a batch decoded from a shared buffer is copied (the buffer stays intact), and a damaged raw frame is E_DIGEST_MISMATCH with nothing written', async () => {
    const { v, file, fh, w } = await setUp();
    fixDigests(v);
    const frame = frameOf(v, [0, 1]);
    const shared = Buffer.concat([frame, Buffer.from('the next frame')]);
    const env = decodeSingleFrame(shared.subarray(0, frame.length));
    if (env.kind !== 'restoreChunks') throw new Error(env.kind);
    await w.write(env.restoreChunks);
    expect(w.transferred).toBe(0);
    expect(shared.subarray(frame.length).toString()).toBe('the next frame');
    const bad = decodeSingleFrame(Buffer.from(frameOf(v, [2, 3], 3)));
    if (bad.kind !== 'restoreChunks') throw new Error(bad.kind);
    expect(await codeOf(w.write(bad.restoreChunks))).toBe('E_DIGEST_MISMATCH');
    await w.close();
    await fh.close();
    const out = await readFile(file);
    expect(out.subarray(0, 2 * CS).equals(v.data.subarray(0, 2 * CS))).toBe(true);
    expect(out.subarray(2 * CS, 4 * CS).equals(Buffer.alloc(2 * CS))).toBe(true);
  });
});

describe('changed-set (bitset)', () => {
  it('unions tracker words with the digest difference of two maps', () => {
    const words = new Uint32Array(4);
    words[0] = 0b1010;
    words[3] = 1 << 31;
    const a = Buffer.alloc(128 * 32);
    const b = Buffer.from(a);
    b[5 * 32] = 1;
    b[100 * 32 + 31] = 1;
    const u = unionOf(setOfWords(words), digestDiffSet(a, b, 128));
    expect([...indexesOf(u, 128)]).toEqual([1, 3, 5, 100, 127]);
    expect(u.cardinality()).toBe(5);
  });
});
