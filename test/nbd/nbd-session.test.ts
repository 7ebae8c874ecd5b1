import { describe, expect, it } from 'vitest';
import { BLOB_CHUNK } from '../../appliance/store/chunk-store.js';
import { ImageIndexBuilder } from '../../appliance/store/image-index.js';
import { ImageSource } from '../../appliance/nbd/image-source.js';
import { readOnlyExport } from '../../appliance/nbd/read-only-export.js';
import type { NbdExport } from '../../appliance/nbd/nbd-export.js';
import { MAX_QUEUED, MAX_QUEUED_BYTES, NbdSession } from '../../appliance/nbd/nbd-session.js';
import { encodeClientFlags, encodeExportRequest, encodeOption, encodeRequest } from '../../appliance/nbd/nbd-codec.js';
import { Cmd, CmdFlag, MAX_PAYLOAD, Opt } from '../../appliance/nbd/nbd-layout.js';
import { MemoryChunkStore } from '../../appliance/testing/memory-chunk-store.js';
import { randomChunk, sha256 } from '../../appliance/testing/store-fixtures.js';

async function waitFor(cond: () => boolean, ms = 5000): Promise<void> {
  const deadline = Date.now() + ms;
  while (!cond()) {
    if (Date.now() > deadline) throw new Error('condition not met in time');
    await new Promise((r) => setImmediate(r));
  }
}

describe('NbdSession', () => {
  it('pauses reading while more than MAX_QUEUED requests wait, resumes once they are served, answers all', async () => {
    const store = new MemoryChunkStore();
    const w = store.openWriter();
    const b = await ImageIndexBuilder.create({ store, writer: w, volumeSize: 8192, chunkSize: 4096 });
    const plain = randomChunk(4096);
    await w.put(BLOB_CHUNK, sha256(plain), plain);
    await b.set(0, sha256(plain));
    const { rootDigest } = await b.finish();
    await w.flush();
    const source = await ImageSource.open(store, rootDigest);

    const events: string[] = [];
    let replies = 0;
    const session = new NbdSession(async (name) => (name === 'n' ? readOnlyExport(source) : undefined), { address: '127.0.0.1' }, {
      write: async (bytes) => {
        // Simple READ replies: 16-byte header + 1 byte.
        if (Buffer.isBuffer(bytes) && bytes.length === 17 && bytes.readUInt32BE(0) === 0x67446698) replies++;
      },
      end: () => events.push('end'),
      pause: () => events.push('pause'),
      resume: () => events.push('resume'),
    });
    await session.start();
    const n = 4 * MAX_QUEUED;
    session.receive(Buffer.concat([
      encodeClientFlags(3),
      encodeOption(Opt.GO, encodeExportRequest('n')),
      ...Array.from({ length: n }, (_, i) => encodeRequest({ type: Cmd.READ, cookie: Buffer.alloc(8, i), offset: i % 8000, length: 1 })),
    ]));
    await waitFor(() => replies === n);
    expect(events).toEqual(['pause', 'resume']);
    session.receive(encodeRequest({ type: Cmd.DISC, cookie: Buffer.alloc(8), offset: 0, length: 0 }));
    await waitFor(() => events.includes('end'));
  });
  it('pauses reading on queued WRITE payload bytes too (a few 32 MiB writes, not 64 requests); every resolved export is released once', async () => {
    let resolved = 0;
    let released = 0;
    let open!: () => void;
    const gate = new Promise<void>((r) => { open = r; });
    let writes = 0;
    const exp: NbdExport = {
      size: 2 * MAX_PAYLOAD, chunkSize: 65536, readOnly: false, canMultiConn: true,
      read: async () => [], runs: async () => [],
      write: async () => { writes++; await gate; },
      zero: async () => undefined,
      release: () => { released++; },
    };
    const events: string[] = [];
    const session = new NbdSession(async (name) => {
      if (name !== 'w') return undefined;
      resolved++;
      return exp;
    }, { address: '10.0.0.9' }, {
      write: async () => undefined,
      end: () => events.push('end'),
      pause: () => events.push('pause'),
      resume: () => events.push('resume'),
    });
    await session.start();
    session.receive(Buffer.concat([
      encodeClientFlags(3),
      encodeOption(Opt.INFO, encodeExportRequest('w')),
      encodeOption(Opt.GO, encodeExportRequest('w')),
      // 16 small writes fill the in-flight slots (held at the gate) ...
      ...Array.from({ length: 16 }, (_, i) => encodeRequest({ type: Cmd.WRITE, cookie: Buffer.alloc(8, i), offset: i, length: 1, payload: Buffer.from([i]) })),
    ]));
    await waitFor(() => writes === 16);
    expect(resolved).toBe(2);
    expect(released).toBe(1); // INFO's, right away
    const big = encodeRequest({ type: Cmd.WRITE, cookie: Buffer.alloc(8, 99), offset: 0, length: MAX_PAYLOAD, payload: Buffer.alloc(MAX_PAYLOAD) });
    // ... then 3 × 32 MiB wait: more than MAX_QUEUED_BYTES, far fewer than MAX_QUEUED requests.
    for (let k = 0; k < 3; k++) session.receive(big);
    expect(3 * MAX_PAYLOAD).toBeGreaterThan(MAX_QUEUED_BYTES);
    expect(events).toEqual(['pause']);
    open();
    await waitFor(() => writes === 19);
    await waitFor(() => events.includes('resume'));
    session.dispose();
    await waitFor(() => released === 2);
  });
  it('WRITE_ZEROES with NO_HOLE over 4 GiB writes bounded pieces (never one 4 GiB buffer); without NO_HOLE it zeroes', async () => {
    const pieces: number[] = [];
    const zeroed: number[] = [];
    const exp: NbdExport = {
      size: 2 ** 33, chunkSize: 65536, readOnly: false, canMultiConn: true,
      read: async () => [], runs: async () => [],
      write: async (_o, d) => { pieces.push(d.length); },
      zero: async (_o, l) => { zeroed.push(l); },
    };
    const replies: number[] = [];
    const session = new NbdSession(async () => exp, { address: '127.0.0.1' }, {
      write: async (b) => { if (Buffer.isBuffer(b) && b.length === 16) replies.push(b.readUInt32BE(4)); },
      end: () => undefined,
    });
    await session.start();
    session.receive(Buffer.concat([
      encodeClientFlags(3),
      encodeOption(Opt.GO, encodeExportRequest('any')),
      encodeRequest({ type: Cmd.WRITE_ZEROES, flags: CmdFlag.NO_HOLE, cookie: Buffer.alloc(8, 1), offset: 5, length: 0xffffffff }),
      encodeRequest({ type: Cmd.WRITE_ZEROES, cookie: Buffer.alloc(8, 2), offset: 0, length: 0xffffffff }),
    ]));
    await waitFor(() => replies.length === 2, 20_000);
    expect(replies).toEqual([0, 0]);
    expect(Math.max(...pieces)).toBeLessThanOrEqual(4 * 1024 * 1024);
    expect(pieces.reduce((a, b) => a + b, 0)).toBe(0xffffffff);
    expect(zeroed).toEqual([0xffffffff]);
  });
});
