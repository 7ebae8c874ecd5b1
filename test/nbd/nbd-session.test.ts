import { describe, expect, it } from 'vitest';
import { BLOB_CHUNK } from '../../appliance/store/chunk-store.js';
import { ImageIndexBuilder } from '../../appliance/store/image-index.js';
import { ImageSource } from '../../appliance/nbd/image-source.js';
import { readOnlyExport } from '../../appliance/nbd/read-only-export.js';
import { MAX_QUEUED, NbdSession } from '../../appliance/nbd/nbd-session.js';
import { encodeClientFlags, encodeExportRequest, encodeOption, encodeRequest } from '../../appliance/nbd/nbd-codec.js';
import { Cmd, Opt } from '../../appliance/nbd/nbd-layout.js';
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
        if (bytes.length === 17 && bytes.readUInt32BE(0) === 0x67446698) replies++;
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
});
