import { describe, expect, it } from 'vitest';
import type { BlocksnapError } from '../../proto/errors.js';
import { encodeFrame } from '../../proto/codec.js';
import { envelope } from '../../proto/messages.js';
import type { Transport } from '../../proto/transport.js';
import { memoryTransportPair } from '../../proto/testing/memory-transport.js';

const closed = (t: Transport) => new Promise<BlocksnapError | undefined>((r) => t.onClose(r));

// Bad input handling, which the contract test cannot inject generically.
describe('memoryTransportPair', () => {
  it.each<[string, Uint8Array | string, number, string]>([
    ['a text message', 'hello', 1008, 'E_FRAME_MALFORMED'],
    ['garbage bytes', Buffer.from([2, 0, 0, 0, 0xff, 0xff]), 1008, 'E_FRAME_MALFORMED'],
    ['a declared length above the limit', Buffer.from([0, 0, 0, 1]), 1009, 'E_FRAME_TOO_LARGE'],
  ])('%s closes the receiver with %s like the ws transport', async (_n, raw, code, errCode) => {
    const [a, b] = memoryTransportPair();
    const [ca, cb] = [closed(a), closed(b)];
    a.sendRaw(raw);
    expect(await cb).toMatchObject({ code: errCode });
    const errA = await ca;
    expect(errA).toMatchObject({ code: 'E_DISCONNECTED' });
    expect(errA!.message).toContain(`${code} ${errCode}`);
  });

  it('drop() is a connection failure for the peer', async () => {
    const [a, b] = memoryTransportPair();
    const [ca, cb] = [closed(a), closed(b)];
    a.drop();
    expect(await ca).toBeUndefined();
    expect(await cb).toMatchObject({ code: 'E_DISCONNECTED' });
  });

  it('counts frames in flight in bufferedAmount until they are delivered', async () => {
    const [a] = memoryTransportPair();
    const env = envelope('ping', { nonce: 3 });
    const p = a.send(env);
    expect(a.bufferedAmount).toBe(encodeFrame(env).length);
    await p;
    expect(a.bufferedAmount).toBe(0);
  });
});
