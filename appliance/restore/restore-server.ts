import type { Logger } from 'pino';
import { BlocksnapError, toBlocksnapError } from '../../proto/errors.js';
import { envelope, messageOf, type Chunk, type Envelope } from '../../proto/messages.js';
import { DIGEST_BYTES, SLOTS_PER_PAGE } from '../../proto/shared/image-root.js';
import {
  RESTORE_BATCH_BYTES, RESTORE_BATCH_PLAIN_BYTES, RESTORE_CHUNK_OVERHEAD, RESTORE_MAP_PAGES, RESTORE_MAX_PER_AGENT, RESTORE_WINDOW_BYTES,
} from '../../proto/shared/restore-protocol.js';
import { zstdCompress } from '../../proto/shared/zstd.js';
import type { Catalog } from '../catalog/catalog.js';
import { ZERO_DIGEST, type BlobLocation, type ChunkStore } from '../store/chunk-store.js';
import { CODEC_NONE, CODEC_ZSTD } from '../store/pack-format.js';
import { ImageIndexReader } from '../store/image-index.js';
import { zstdRawFrame, zstdRawFrameLength, zstdRawFrameSlots } from './zstd-raw-frame.js';

/** What the restore server needs of a session: who it is and how to answer. */
export interface RestorePeer {
  readonly id: string;
  readonly agentName: string;
  /**
   * Encodes the envelope before it returns (a Transport's send does: the
   * batch's buffer is reused after the call) and resolves when the frame is
   * handed to the socket (the map is sent with this backpressure).
   */
  send(env: Envelope): Promise<void>;
}

type RestoreFrame = Envelope & { kind: 'restoreRequest' | 'restoreWant' | 'restoreAck' | 'restoreEnd' };

interface BatchItem {
  index: number;
  digest: Buffer;
  /** Where the store keeps the blob (when it can read it with readStoredv). */
  loc: BlobLocation | undefined;
  /** Length of its frame on the wire when read directly, else null (frameOf). */
  wire: number | null;
}

/** The wire frame length of a blob read as stored: its zstd frame, or plain bytes in a raw frame; null: anything else. */
function wireLength(loc: BlobLocation): number | null {
  if (loc.codec === CODEC_ZSTD) return loc.storedLength;
  if (loc.codec === CODEC_NONE && loc.storedLength === loc.plainLength) return zstdRawFrameLength(loc.plainLength);
  return null;
}

/**
 * The appliance's side of a restore (DESIGN.md §4.6): one `RestoreStream`
 * per request of a connected agent. It sends the image's map in pages, then
 * the chunks the agent asks for, in increasing index order, never more than
 * RESTORE_WINDOW_BYTES unacknowledged. An agent may restore only its own
 * images; a range outside the image or a ZERO chunk asked for is refused
 * (E_CHUNK_RANGE) and the stream ends.
 */
export class RestoreServer {
  private readonly streams = new Map<string, RestoreStream>();

  constructor(
    private readonly catalog: Catalog,
    private readonly store: ChunkStore,
    private readonly log: Logger,
    private readonly windowBytes = RESTORE_WINDOW_BYTES,
  ) {}

  /** Restores running now (for status). */
  active(): { requestId: string; agent: string; imageId: string; chunksSent: number }[] {
    return [...this.streams.values()].map((s) => ({ requestId: s.requestId, agent: s.peer.agentName, imageId: s.imageId, chunksSent: s.chunksSent }));
  }

  onFrame(peer: RestorePeer, env: RestoreFrame): void {
    const requestId = (messageOf(env) as { requestId: string }).requestId;
    const key = `${peer.id}/${requestId}`;
    if (env.kind === 'restoreRequest') {
      if (this.streams.has(key)) return this.refuse(peer, requestId, 'E_PROTOCOL', `restore ${requestId} is already running`);
      const mine = [...this.streams.values()].filter((s) => s.peer.agentName === peer.agentName).length;
      if (mine >= RESTORE_MAX_PER_AGENT) return this.refuse(peer, requestId, 'E_BUSY', `agent ${peer.agentName} already runs ${mine} restores`);
      const img = this.catalog.image(env.restoreRequest.imageId);
      // Another agent's image is answered like a missing one: ids are not a way to learn about other hosts.
      if (!img || img.agent !== peer.agentName) {
        return this.refuse(peer, requestId, 'E_NOT_FOUND', `no image ${env.restoreRequest.imageId} of agent ${peer.agentName}`);
      }
      if (img.damage.length > 0) {
        return this.refuse(peer, requestId, 'E_STORE_CORRUPT', `image ${img.id} is damaged: ${img.damage.map((d) => d.object).join(', ')}`);
      }
      const stream = new RestoreStream(peer, requestId, img.id, img.volume, Buffer.from(img.rootDigest, 'hex'), this.store, this.windowBytes,
        this.log.child({ restore: requestId, agent: peer.agentName, image: img.id }));
      this.streams.set(key, stream);
      this.log.info({ restore: requestId, agent: peer.agentName, image: img.id, changedOnly: env.restoreRequest.changedOnly }, 'restore started');
      stream.run().catch((e) => {
        const err = toBlocksnapError(e, 'E_STORE_IO');
        if (!stream.ended) this.refuse(peer, requestId, err.code, err.message);
        stream.end();
      }).finally(() => this.streams.delete(key));
      return;
    }
    const stream = this.streams.get(key);
    if (!stream) {
      // A late ack or end of a restore that already ended is harmless.
      if (env.kind === 'restoreWant') this.refuse(peer, requestId, 'E_UNKNOWN_JOB', `no restore ${requestId} is running`);
      return;
    }
    try {
      stream.onAgentFrame(env);
    } catch (e) {
      const err = toBlocksnapError(e, 'E_PROTOCOL');
      this.refuse(peer, requestId, err.code, err.message);
      stream.end();
    }
  }

  /** The connection is gone: its restores stop (the agent reports the target's state). */
  sessionClosed(peerId: string): void {
    for (const [key, s] of this.streams) if (s.peer.id === peerId) {
      s.end();
      this.streams.delete(key);
    }
  }

  close(): void {
    for (const s of this.streams.values()) s.end();
    this.streams.clear();
  }

  private refuse(peer: RestorePeer, requestId: string, code: BlocksnapError['code'], message: string): void {
    this.log.warn({ restore: requestId, agent: peer.agentName, code, message }, 'restore refused');
    peer.send(envelope('restoreEnd', { requestId, ok: false, code, message })).catch(() => undefined);
  }
}

/** One restore: the map, then the wanted chunks under the window. */
class RestoreStream {
  ended = false;
  chunksSent = 0;
  private reader: ImageIndexReader | null = null;
  /** Wanted ranges not yet streamed, in order. */
  private readonly wants: { first: number; end: number }[] = [];
  private wantsDone = false;
  private lastWantEnd = 0;
  private seq = 0;
  private inFlight = 0;
  /** Bytes of each unacknowledged batch by seq. */
  private readonly unacked = new Map<number, number>();
  private wake: (() => void) | null = null;
  /** Where a batch's frames are read into (fetch). */
  private scratch = Buffer.alloc(0);

  constructor(
    readonly peer: RestorePeer,
    readonly requestId: string,
    readonly imageId: string,
    private readonly volume: string,
    private readonly rootDigest: Buffer,
    private readonly store: ChunkStore,
    private readonly windowBytes: number,
    private readonly log: Logger,
  ) {}

  end(): void {
    this.ended = true;
    this.poke();
  }

  onAgentFrame(env: RestoreFrame): void {
    switch (env.kind) {
      case 'restoreWant': {
        if (this.wantsDone) throw new BlocksnapError('E_PROTOCOL', 'restoreWant after the last one');
        const count = this.reader?.chunkCount;
        if (count === undefined) throw new BlocksnapError('E_PROTOCOL', 'restoreWant before the map was sent');
        for (const r of env.restoreWant.ranges) {
          if (r.first < this.lastWantEnd) throw new BlocksnapError('E_PROTOCOL', `restoreWant: range at ${r.first} goes back (previous ended at ${this.lastWantEnd})`);
          if (r.first + r.count > count) {
            throw new BlocksnapError('E_CHUNK_RANGE', `restoreWant: chunks ${r.first}..${r.first + r.count - 1} are outside the image (0..${count - 1})`);
          }
          this.wants.push({ first: r.first, end: r.first + r.count });
          this.lastWantEnd = r.first + r.count;
        }
        if (env.restoreWant.last) this.wantsDone = true;
        break;
      }
      case 'restoreAck': {
        const bytes = this.unacked.get(env.restoreAck.seq);
        if (bytes === undefined) throw new BlocksnapError('E_PROTOCOL', `restoreAck of batch ${env.restoreAck.seq}, which is not in flight`);
        this.unacked.delete(env.restoreAck.seq);
        this.inFlight -= bytes;
        break;
      }
      case 'restoreEnd':
        this.log.info({ ok: env.restoreEnd.ok, code: env.restoreEnd.code, message: env.restoreEnd.message, chunksSent: this.chunksSent }, 'restore ended by the agent');
        this.ended = true;
        break;
      case 'restoreRequest':
        break;
    }
    this.poke();
  }

  private poke(): void {
    const w = this.wake;
    this.wake = null;
    w?.();
  }

  private waitEvent(): Promise<void> {
    return new Promise((r) => (this.wake = r));
  }

  async run(): Promise<void> {
    const reader = await ImageIndexReader.open(this.store, this.rootDigest);
    await this.sendMap(reader);
    this.reader = reader;
    let pageNo = -1;
    let page: Buffer | null = null;
    const digestOf = async (i: number): Promise<Buffer> => {
      const p = Math.floor(i / SLOTS_PER_PAGE);
      if (p !== pageNo) {
        page = await reader.loadPage(p);
        pageNo = p;
      }
      const off = (i % SLOTS_PER_PAGE) * DIGEST_BYTES;
      const digest = page ? page.subarray(off, off + DIGEST_BYTES) : ZERO_DIGEST;
      if (digest.equals(ZERO_DIGEST)) throw new BlocksnapError('E_CHUNK_RANGE', `chunk ${i} is ZERO in the image: it is written as a hole, not fetched`);
      return Buffer.from(digest);
    };
    while (!this.ended) {
      if (this.wants.length === 0) {
        if (this.wantsDone) break;
        await this.waitEvent();
        continue;
      }
      // The next batch: wanted chunks in order, about RESTORE_BATCH_BYTES of frames and at most about
      // RESTORE_BATCH_PLAIN_BYTES of plain data (compressible chunks: the agent's worker then checks and
      // writes it with one decompression).
      const items: BatchItem[] = [];
      let estimate = 0;
      let plain = 0;
      while (estimate < RESTORE_BATCH_BYTES && plain < RESTORE_BATCH_PLAIN_BYTES && this.wants.length > 0) {
        const want = this.wants[0]!;
        const index = want.first++;
        if (want.first >= want.end) this.wants.shift();
        const digest = await digestOf(index);
        const loc = this.store.readStoredv ? this.store.locate(digest) : undefined;
        const wire = loc ? wireLength(loc) : null;
        items.push({ index, digest, loc, wire });
        estimate += (wire ?? loc?.plainLength ?? reader.chunkSize) + RESTORE_CHUNK_OVERHEAD;
        plain += loc?.plainLength ?? reader.chunkSize;
      }
      const chunks = await this.fetch(items);
      if (this.ended) break;
      let bytes = 0;
      for (const c of chunks) bytes += c.data.length + RESTORE_CHUNK_OVERHEAD;
      const seq = ++this.seq;
      this.unacked.set(seq, bytes);
      this.inFlight += bytes;
      this.chunksSent += chunks.length;
      // Awaited (handed to the socket) before the next batch is built: frames waiting in the
      // process outlived young-generation GCs, and 2 MiB each of them retained in the old
      // generation made V8 run a full mark-compact every ~64 MiB restored.
      try {
        await this.peer.send(envelope('restoreChunks', { requestId: this.requestId, seq, chunks }));
      } catch {
        this.end();
        break;
      }
      // Flow control: the agent acks a batch once it is written.
      while (!this.ended && this.inFlight >= this.windowBytes) await this.waitEvent();
    }
    if (!this.ended) {
      // Everything asked for was sent; the agent ends the restore with RestoreEnd once written.
      while (!this.ended) await this.waitEvent();
    }
  }

  /**
   * The batch's chunks as zstd frames, laid out in one buffer: a stored zstd
   * frame goes as it is, a blob stored plain gets a raw-block frame header
   * (zstd-raw-frame.ts) and its bytes are read in behind it; blobs adjacent
   * in one pack are one vectored read (a full image's chunks mostly are).
   * This replaced a read, a buffer and a promise per chunk plus the copy
   * into the raw frame, which with the frame encoding and the socket made
   * the appliance's main thread cost ≈ 3.6 s of CPU per GiB restored. Blobs
   * the store cannot read that way (no readStoredv, another codec, a read
   * that failed: GC may have moved them) go through frameOf one by one.
   */
  private async fetch(items: BatchItem[]): Promise<Chunk[]> {
    let total = 0;
    for (const it of items) total += it.wire ?? 0;
    // One buffer per stream, reused: peer.send encodes (copies) the batch before it returns
    // (proto/transport.ts), and a 2 MiB buffer per batch made V8 collect garbage far more often.
    if (this.scratch.length < total) this.scratch = Buffer.allocUnsafeSlow(Math.max(total, 2 * RESTORE_BATCH_BYTES));
    const buf = this.scratch;
    const chunks: Chunk[] = new Array(items.length);
    const runs: { pack: string; offset: number; end: number; targets: Uint8Array[]; ks: number[] }[] = [];
    const slow: number[] = [];
    let pos = 0;
    items.forEach((it, k) => {
      const loc = it.loc;
      if (!loc || it.wire === null) {
        slow.push(k);
        return;
      }
      const data = buf.subarray(pos, pos + it.wire);
      const targets = loc.codec === CODEC_ZSTD ? [data] : zstdRawFrameSlots(buf, pos, loc.plainLength);
      pos += it.wire;
      chunks[k] = { index: it.index, digest: it.digest, zero: false, data, plainLength: loc.plainLength };
      const last = runs[runs.length - 1];
      if (last && last.pack === loc.pack && last.end === loc.offset) {
        last.targets.push(...targets);
        last.end += loc.storedLength;
        last.ks.push(k);
      } else {
        runs.push({ pack: loc.pack, offset: loc.offset, end: loc.offset + loc.storedLength, targets, ks: [k] });
      }
    });
    await Promise.all([
      ...runs.map((r) => this.store.readStoredv!(r.pack, r.offset, r.targets).catch(() => {
        for (const k of r.ks) slow.push(k);
      })),
    ]);
    await Promise.all(slow.map(async (k) => {
      const it = items[k]!;
      const { data, plainLength } = await this.frameOf(it.digest);
      chunks[k] = { index: it.index, digest: it.digest, zero: false, data, plainLength };
    }));
    return chunks;
  }

  /**
   * A chunk as a zstd frame. The stored frame goes as it is when the store
   * can hand it out (no decompress, hash and recompress here: the agent
   * decompresses and checks every chunk's SHA-256 itself); else the plain
   * bytes are read (checked by the store) and compressed.
   */
  private async frameOf(digest: Buffer): Promise<{ data: Buffer; plainLength: number }> {
    if (this.store.getStored) {
      const s = await this.store.getStored(digest);
      if (s.codec === 1) return { data: s.data, plainLength: s.plainLength };
      // Stored plain (it did not compress): wrapped as raw zstd blocks, not compressed again.
      if (s.codec === 0 && s.data.length === s.plainLength) return { data: zstdRawFrame(s.data), plainLength: s.plainLength };
    }
    const plain = await this.store.get(digest);
    return { data: zstdCompress(plain), plainLength: plain.length };
  }

  /** The map in RestoreMap messages of up to RESTORE_MAP_PAGES non-ZERO pages each (ZERO pages are not sent). */
  private async sendMap(reader: ImageIndexReader): Promise<void> {
    const base = {
      requestId: this.requestId, imageId: this.imageId, volume: this.volume, volumeSize: reader.volumeSize,
      chunkSize: reader.chunkSize, rootDigest: this.rootDigest,
    };
    let group: Buffer[] = [];
    let groupFirst = -1;
    const send = async (last: boolean) => {
      const msg = { ...base, firstIndex: Math.max(0, groupFirst), digests: Buffer.concat(group), last };
      group = [];
      groupFirst = -1;
      await this.peer.send(envelope('restoreMap', msg));
    };
    for await (const p of reader.pages({ skipZero: true })) {
      if (this.ended) return;
      // A message holds consecutive pages only: a gap (a ZERO page) starts a new one.
      if (group.length > 0 && (group.length >= RESTORE_MAP_PAGES || groupFirst + group.length * SLOTS_PER_PAGE !== p.firstIndex)) await send(false);
      if (groupFirst < 0) groupFirst = p.firstIndex;
      const used = Math.min(SLOTS_PER_PAGE, reader.chunkCount - p.firstIndex);
      group.push(p.digests!.subarray(0, used * DIGEST_BYTES));
    }
    await send(true);
  }
}
