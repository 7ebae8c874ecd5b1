import type { Logger } from 'pino';
import { BlocksnapError, toBlocksnapError } from '../../proto/errors.js';
import { envelope, messageOf, type Chunk, type Envelope } from '../../proto/messages.js';
import { DIGEST_BYTES, SLOTS_PER_PAGE } from '../../proto/shared/image-root.js';
import {
  RESTORE_BATCH_BYTES, RESTORE_CHUNK_OVERHEAD, RESTORE_MAP_PAGES, RESTORE_MAX_PER_AGENT, RESTORE_WINDOW_BYTES,
} from '../../proto/shared/restore-protocol.js';
import { zstdCompress } from '../../proto/shared/zstd.js';
import type { Catalog } from '../catalog/catalog.js';
import { ZERO_DIGEST, type ChunkStore } from '../store/chunk-store.js';
import { ImageIndexReader } from '../store/image-index.js';
import { zstdRawFrame } from './zstd-raw-frame.js';

/** What the restore server needs of a session: who it is and how to answer. */
export interface RestorePeer {
  readonly id: string;
  readonly agentName: string;
  /** Resolves when the frame is handed to the socket (the map is sent with this backpressure). */
  send(env: Envelope): Promise<void>;
}

type RestoreFrame = Envelope & { kind: 'restoreRequest' | 'restoreWant' | 'restoreAck' | 'restoreEnd' };

/** Chunks fetched from the store at once while streaming (the store reads them on its pool). */
const FETCH_AHEAD = 16;

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
    let batch: Chunk[] = [];
    let batchBytes = 0;
    const flush = () => {
      if (batch.length === 0) return;
      const seq = ++this.seq;
      this.unacked.set(seq, batchBytes);
      this.inFlight += batchBytes;
      this.peer.send(envelope('restoreChunks', { requestId: this.requestId, seq, chunks: batch })).catch(() => this.end());
      batch = [];
      batchBytes = 0;
    };
    while (!this.ended) {
      const want = this.wants[0];
      if (!want) {
        flush();
        if (this.wantsDone) break;
        await this.waitEvent();
        continue;
      }
      // Digests of the next few chunks of this range (one page at a time is loaded).
      const end = Math.min(want.end, want.first + FETCH_AHEAD);
      const items: { index: number; digest: Buffer }[] = [];
      for (let i = want.first; i < end; i++) {
        const p = Math.floor(i / SLOTS_PER_PAGE);
        if (p !== pageNo) {
          page = await reader.loadPage(p);
          pageNo = p;
        }
        const off = (i % SLOTS_PER_PAGE) * DIGEST_BYTES;
        const digest = page ? page.subarray(off, off + DIGEST_BYTES) : ZERO_DIGEST;
        if (digest.equals(ZERO_DIGEST)) throw new BlocksnapError('E_CHUNK_RANGE', `chunk ${i} is ZERO in the image: it is written as a hole, not fetched`);
        items.push({ index: i, digest: Buffer.from(digest) });
      }
      want.first = end;
      if (want.first >= want.end) this.wants.shift();
      const frames = await Promise.all(items.map((it) => this.frameOf(it.digest)));
      for (let k = 0; k < items.length; k++) {
        const { data, plainLength } = frames[k]!;
        batch.push({ index: items[k]!.index, digest: items[k]!.digest, zero: false, data, plainLength });
        batchBytes += data.length + RESTORE_CHUNK_OVERHEAD;
        this.chunksSent++;
        if (batchBytes >= RESTORE_BATCH_BYTES) flush();
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
