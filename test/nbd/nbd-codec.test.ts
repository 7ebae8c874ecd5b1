import { describe, expect, it } from 'vitest';
import {
  MAX_PAUSED_BYTES,
  NbdServerDecoder,
  encodeBlockStatus,
  encodeClientFlags,
  encodeErrorChunk,
  encodeExportNameReply,
  encodeExportRequest,
  encodeGreeting,
  encodeInfoBlockSize,
  encodeInfoExport,
  encodeMetaContext,
  encodeMetaContextRequest,
  encodeNoneDone,
  encodeOffsetData,
  encodeOffsetHole,
  encodeOption,
  encodeOptionReply,
  encodeRequest,
  encodeServerEntry,
  encodeSimpleReply,
  parseExportRequest,
  parseMetaContextRequest,
  type NbdClientMessage,
} from '../../appliance/nbd/nbd-codec.js';
import { BASE_ALLOCATION, Cmd, Info, MAX_OPTION_DATA, MAX_PAYLOAD, Opt, Rep, State, TransmitFlag } from '../../appliance/nbd/nbd-layout.js';

const hex = (b: Buffer): string => b.toString('hex');
const cookie = Buffer.from('0102030405060708', 'hex');

function plain(m: NbdClientMessage[]): unknown {
  return JSON.parse(JSON.stringify(m, (_k, v) => (v && v.type === 'Buffer' && Array.isArray(v.data) ? Buffer.from(v.data).toString('hex') : v)));
}

describe('NBD codec byte layouts (pinned)', () => {
  it('greeting: NBDMAGIC, IHAVEOPT, u16 handshake flags', () => {
    expect(hex(encodeGreeting())).toBe('4e42444d41474943' + '49484156454f5054' + '0003');
  });

  it('option reply: REP magic, option, type, length, data', () => {
    expect(hex(encodeOptionReply(Opt.GO, Rep.ACK))).toBe('0003e889045565a9' + '00000007' + '00000001' + '00000000');
    expect(hex(encodeOptionReply(Opt.LIST, Rep.ERR_UNSUP, Buffer.from('x')))).toBe(
      '0003e889045565a9' + '00000003' + '80000001' + '00000001' + '78',
    );
    expect(Rep.ERR_UNKNOWN).toBe(0x80000006);
    expect(hex(encodeServerEntry('ab'))).toBe('00000002' + '6162');
  });

  it('info payloads: EXPORT (type, u64 size, u16 flags) and BLOCK_SIZE (type, min, preferred, max)', () => {
    const flags = TransmitFlag.HAS_FLAGS | TransmitFlag.READ_ONLY;
    expect(hex(encodeInfoExport(0x123456789a, flags))).toBe('0000' + '000000123456789a' + '0003');
    expect(hex(encodeInfoBlockSize(1, 65536, 33554432))).toBe('0003' + '00000001' + '00010000' + '02000000');
  });

  it('EXPORT_NAME reply: u64 size, u16 flags, 124 zero bytes unless NO_ZEROES', () => {
    expect(hex(encodeExportNameReply(512, 3, true))).toBe('0000000000000200' + '0003');
    const padded = encodeExportNameReply(512, 3, false);
    expect(padded.length).toBe(134);
    expect(padded.subarray(10).equals(Buffer.alloc(124))).toBe(true);
  });

  it('simple reply: magic, error, cookie, data', () => {
    expect(hex(encodeSimpleReply(cookie, 1))).toBe('67446698' + '00000001' + '0102030405060708');
    expect(hex(encodeSimpleReply(cookie, 0, Buffer.from('hi')))).toBe('67446698' + '00000000' + '0102030405060708' + '6869');
  });

  it('structured chunks: OFFSET_DATA, OFFSET_HOLE, NONE+DONE, ERROR', () => {
    expect(hex(encodeOffsetData(cookie, 4096, Buffer.from('ab'), false))).toBe(
      '668e33ef' + '0000' + '0001' + '0102030405060708' + '0000000a' + '0000000000001000' + '6162',
    );
    expect(hex(encodeOffsetHole(cookie, 8192, 65536, true))).toBe(
      '668e33ef' + '0001' + '0002' + '0102030405060708' + '0000000c' + '0000000000002000' + '00010000',
    );
    expect(hex(encodeNoneDone(cookie))).toBe('668e33ef' + '0001' + '0000' + '0102030405060708' + '00000000');
    expect(hex(encodeErrorChunk(cookie, 22, 'no'))).toBe(
      '668e33ef' + '0001' + '8001' + '0102030405060708' + '00000008' + '00000016' + '0002' + '6e6f',
    );
  });

  it('meta contexts: request data, META_CONTEXT reply payload, BLOCK_STATUS chunk', () => {
    expect(hex(encodeMetaContextRequest('ab', ['c', 'de']))).toBe(
      '00000002' + '6162' + '00000002' + '00000001' + '63' + '00000002' + '6465',
    );
    expect(hex(encodeMetaContext(1, BASE_ALLOCATION))).toBe('00000001' + Buffer.from('base:allocation').toString('hex'));
    expect(State).toEqual({ HOLE: 1, ZERO: 2 });
    expect(hex(encodeBlockStatus(cookie, 1, [{ length: 4096, flags: 0 }, { length: 8192, flags: 3 }], true))).toBe(
      '668e33ef' + '0001' + '0005' + '0102030405060708' + '00000014' + '00000001' + '00001000' + '00000000' + '00002000' + '00000003',
    );
  });

  it('client side: flags, option, GO data, request (+ WRITE payload)', () => {
    expect(hex(encodeClientFlags(3))).toBe('00000003');
    expect(hex(encodeOption(Opt.STRUCTURED_REPLY))).toBe('49484156454f5054' + '00000008' + '00000000');
    expect(hex(encodeExportRequest('ab', [Info.BLOCK_SIZE]))).toBe('00000002' + '6162' + '0001' + '0003');
    expect(hex(encodeRequest({ type: Cmd.READ, flags: 1, cookie, offset: 0x10000, length: 512 }))).toBe(
      '25609513' + '0001' + '0000' + '0102030405060708' + '0000000000010000' + '00000200',
    );
    expect(hex(encodeRequest({ type: Cmd.WRITE, cookie, offset: 0, length: 2, payload: Buffer.from('zz') }))).toBe(
      '25609513' + '0000' + '0001' + '0102030405060708' + '0000000000000000' + '00000002' + '7a7a',
    );
  });
});

const handshake = Buffer.concat([
  encodeClientFlags(3),
  encodeOption(Opt.STRUCTURED_REPLY),
  encodeOption(Opt.LIST),
  encodeOption(Opt.INFO, encodeExportRequest('disk-é', [Info.BLOCK_SIZE, Info.NAME])),
  encodeOption(99, Buffer.from('whatever')),
  encodeOption(Opt.SET_META_CONTEXT, encodeMetaContextRequest('disk-é', [BASE_ALLOCATION, 'x:y'])),
  encodeOption(Opt.GO, encodeExportRequest('disk-é', [])),
]);
const transmission = Buffer.concat([
  encodeRequest({ type: Cmd.READ, cookie, offset: 65536 * 3 + 7, length: 100_000 }),
  encodeRequest({ type: Cmd.WRITE, flags: 1, cookie: Buffer.alloc(8, 9), offset: 512, length: 5, payload: Buffer.from('hello') }),
  encodeRequest({ type: Cmd.FLUSH, cookie, offset: 0, length: 0 }),
  encodeRequest({ type: Cmd.TRIM, flags: 1, cookie, offset: 4096, length: 2 ** 31 }),
  encodeRequest({ type: Cmd.WRITE_ZEROES, flags: 3, cookie, offset: 2 ** 40, length: 65537 }),
  encodeRequest({ type: Cmd.WRITE, cookie: Buffer.alloc(8, 7), offset: 3, length: 300, payload: Buffer.alloc(300, 0x5a) }),
  encodeRequest({ type: Cmd.BLOCK_STATUS, flags: 8, cookie, offset: 2 ** 33, length: 2 ** 31 }),
  encodeRequest({ type: Cmd.DISC, cookie, offset: 0, length: 0 }),
]);
const stream = Buffer.concat([handshake, transmission]);
const goMsg = (m: NbdClientMessage | undefined): boolean => m?.kind === 'option' && m.option === Opt.GO;

/** Pushes the pieces in order, accepting the GO the way the server does. */
function decodeAll(pieces: Buffer[]): { msgs: NbdClientMessage[]; d: NbdServerDecoder } {
  const d = new NbdServerDecoder();
  const msgs: NbdClientMessage[] = [];
  const add = (out: NbdClientMessage[]): void => {
    msgs.push(...out);
    if (goMsg(out.at(-1))) add(d.startTransmission());
  };
  for (const p of pieces) add(d.push(p));
  return { msgs, d };
}

const expected = [
  { kind: 'clientFlags', flags: 3 },
  { kind: 'option', option: Opt.STRUCTURED_REPLY, data: '' },
  { kind: 'option', option: Opt.LIST, data: '' },
  {
    kind: 'option',
    option: Opt.INFO,
    data: hex(encodeExportRequest('disk-é', [Info.BLOCK_SIZE, Info.NAME])),
    exportRequest: { name: 'disk-é', infos: [Info.BLOCK_SIZE, Info.NAME] },
  },
  { kind: 'option', option: 99, data: hex(Buffer.from('whatever')) },
  {
    kind: 'option',
    option: Opt.SET_META_CONTEXT,
    data: hex(encodeMetaContextRequest('disk-é', [BASE_ALLOCATION, 'x:y'])),
    metaContextRequest: { name: 'disk-é', queries: [BASE_ALLOCATION, 'x:y'] },
  },
  { kind: 'option', option: Opt.GO, data: hex(encodeExportRequest('disk-é', [])), exportRequest: { name: 'disk-é', infos: [] } },
  { kind: 'request', flags: 0, type: Cmd.READ, cookie: hex(cookie), offset: 65536 * 3 + 7, length: 100_000 },
  { kind: 'request', flags: 1, type: Cmd.WRITE, cookie: '0909090909090909', offset: 512, length: 5, payload: hex(Buffer.from('hello')) },
  { kind: 'request', flags: 0, type: Cmd.FLUSH, cookie: hex(cookie), offset: 0, length: 0 },
  { kind: 'request', flags: 1, type: Cmd.TRIM, cookie: hex(cookie), offset: 4096, length: 2 ** 31 },
  { kind: 'request', flags: 3, type: Cmd.WRITE_ZEROES, cookie: hex(cookie), offset: 2 ** 40, length: 65537 },
  { kind: 'request', flags: 0, type: Cmd.WRITE, cookie: '0707070707070707', offset: 3, length: 300, payload: '5a'.repeat(300) },
  { kind: 'request', flags: 8, type: Cmd.BLOCK_STATUS, cookie: hex(cookie), offset: 2 ** 33, length: 2 ** 31 },
  { kind: 'request', flags: 0, type: Cmd.DISC, cookie: hex(cookie), offset: 0, length: 0 },
];

describe('NbdServerDecoder', () => {
  it('decodes a whole handshake and transmission stream', () => {
    const { msgs, d } = decodeAll([stream]);
    expect(plain(msgs)).toEqual(expected);
    expect(d.buffered).toBe(0);
  });

  it('gives identical results for a split at every byte position', () => {
    for (let at = 0; at <= stream.length; at++) {
      const { msgs, d } = decodeAll([stream.subarray(0, at), stream.subarray(at)]);
      expect(d.buffered, `split at ${at}`).toBe(0);
      expect(plain(msgs), `split at ${at}`).toEqual(expected);
    }
  });

  it('gives identical results one byte at a time', () => {
    const pieces: Buffer[] = [];
    for (let i = 0; i < stream.length; i++) pieces.push(stream.subarray(i, i + 1));
    const { msgs, d } = decodeAll(pieces);
    expect(d.buffered).toBe(0);
    expect(plain(msgs)).toEqual(expected);
  });

  it('holds everything after a GO until the server decides, and goes on with options when it refuses', () => {
    const d = new NbdServerDecoder();
    const refusedThenInfo = Buffer.concat([
      encodeClientFlags(1),
      encodeOption(Opt.GO, encodeExportRequest('nope')),
      encodeOption(Opt.ABORT),
    ]);
    const out = d.push(refusedThenInfo);
    expect(out.map((m) => m.kind)).toEqual(['clientFlags', 'option']);
    expect(d.buffered).toBe(16);
    expect(d.currentPhase).toBe('paused');
    expect(d.resumeOptions()).toEqual([{ kind: 'option', option: Opt.ABORT, data: Buffer.alloc(0) }]);
    expect(() => d.startTransmission()).toThrow(expect.objectContaining({ code: 'E_PROTOCOL' }));
  });

  it('STARTTLS pauses like GO (what follows is TLS); the server resumes options after the upgrade', () => {
    const d = new NbdServerDecoder();
    const out = d.push(Buffer.concat([encodeClientFlags(1), encodeOption(Opt.STARTTLS)]));
    expect(out[1]).toMatchObject({ kind: 'option', option: Opt.STARTTLS });
    expect(d.currentPhase).toBe('paused');
    expect(d.push(Buffer.from([0x16, 3, 1]))).toEqual([]); // a TLS record is never parsed as an option
    expect(d.buffered).toBe(3);
  });

  it('while paused, at most one largest request is held: more is a protocol error', () => {
    const d = new NbdServerDecoder();
    d.push(Buffer.concat([encodeClientFlags(1), encodeOption(Opt.GO, encodeExportRequest('x'))]));
    expect(d.currentPhase).toBe('paused');
    d.push(Buffer.alloc(MAX_PAUSED_BYTES));
    expect(() => d.push(Buffer.alloc(1))).toThrow(expect.objectContaining({ code: 'E_PROTOCOL' }));
  });

  it('an oversized WRITE is refused from its header at every split of the header, before its payload is held', () => {
    const header = encodeRequest({ type: Cmd.READ, cookie, offset: 0, length: MAX_PAYLOAD + 1 });
    header.writeUInt16BE(Cmd.WRITE, 6);
    for (let at = 0; at <= header.length; at++) {
      const d = new NbdServerDecoder({ phase: 'transmission' });
      const push = (): void => {
        d.push(header.subarray(0, at));
        d.push(header.subarray(at));
      };
      expect(push, `split at ${at}`).toThrow(expect.objectContaining({ code: 'E_PROTOCOL' }));
    }
    // Exactly MAX_PAYLOAD is accepted and waits for its payload.
    const ok = encodeRequest({ type: Cmd.READ, cookie, offset: 0, length: MAX_PAYLOAD });
    ok.writeUInt16BE(Cmd.WRITE, 6);
    const d = new NbdServerDecoder({ phase: 'transmission' });
    expect(d.push(ok)).toEqual([]);
    expect(d.buffered).toBe(28);
  });

  it('EXPORT_NAME carries the name as its whole data and pauses too', () => {
    const d = new NbdServerDecoder();
    const out = d.push(Buffer.concat([encodeClientFlags(0), encodeOption(Opt.EXPORT_NAME, Buffer.from('vol'))]));
    expect(out[1]).toMatchObject({ kind: 'option', option: Opt.EXPORT_NAME, exportRequest: { name: 'vol', infos: [] } });
    expect(d.currentPhase).toBe('paused');
  });

  it('malformed GO/INFO data gives no exportRequest (the server answers ERR_INVALID)', () => {
    expect(parseExportRequest(Buffer.alloc(3))).toBeUndefined();
    const bad = Buffer.concat([encodeExportRequest('ab', [1]), Buffer.from([0])]);
    expect(parseExportRequest(bad)).toBeUndefined();
    const short = Buffer.from('00000009616200', 'hex');
    expect(parseExportRequest(short)).toBeUndefined();
    expect(parseExportRequest(encodeExportRequest('', []))).toEqual({ name: '', infos: [] });
    const meta = encodeMetaContextRequest('ab', ['q']);
    expect(parseMetaContextRequest(meta)).toEqual({ name: 'ab', queries: ['q'] });
    expect(parseMetaContextRequest(meta.subarray(0, meta.length - 1))).toBeUndefined();
    expect(parseMetaContextRequest(Buffer.concat([meta, Buffer.from([0])]))).toBeUndefined();
    expect(parseMetaContextRequest(encodeMetaContextRequest('ab', []))).toEqual({ name: 'ab', queries: [] });
  });

  it('refuses a wrong option magic, an oversized option, a wrong request magic and an oversized write from the header alone', () => {
    const code = expect.objectContaining({ code: 'E_PROTOCOL' });
    const badOpt = encodeOption(Opt.LIST);
    badOpt[0] ^= 1;
    expect(() => new NbdServerDecoder().push(Buffer.concat([encodeClientFlags(1), badOpt]))).toThrow(code);
    const big = encodeOption(Opt.LIST).subarray(0, 16);
    big.writeUInt32BE(MAX_OPTION_DATA + 1, 12);
    expect(() => new NbdServerDecoder().push(Buffer.concat([encodeClientFlags(1), big]))).toThrow(code);
    const badReq = encodeRequest({ type: Cmd.READ, cookie, offset: 0, length: 1 });
    badReq[3] ^= 1;
    expect(() => new NbdServerDecoder({ phase: 'transmission' }).push(badReq)).toThrow(code);
    const bigWrite = encodeRequest({ type: Cmd.READ, cookie, offset: 0, length: MAX_PAYLOAD + 1 });
    bigWrite.writeUInt16BE(Cmd.WRITE, 6);
    expect(() => new NbdServerDecoder({ phase: 'transmission' }).push(bigWrite)).toThrow(code);
  });

  it('a READ of any length carries no payload; offsets above 2^32 decode exactly', () => {
    const d = new NbdServerDecoder({ phase: 'transmission' });
    const r = d.push(encodeRequest({ type: Cmd.READ, cookie, offset: 2 ** 40 + 5, length: 0xffffffff }));
    expect(r).toEqual([expect.objectContaining({ type: Cmd.READ, offset: 2 ** 40 + 5, length: 0xffffffff })]);
    expect(r[0]).not.toHaveProperty('payload');
    expect(d.buffered).toBe(0);
  });
});
