import { BlocksnapError } from '../../proto/errors.js';
import { envelope, type Envelope, type MessageMap } from '../../proto/messages.js';
import { imageGeometry, DIGEST_BYTES, SLOTS_PER_PAGE, imageRootDigest, type ImageGeometry } from '../../proto/shared/image-root.js';

/**
 * The agent's side of one restore's wire exchange (DESIGN.md §4.6): it
 * assembles the image's map from RestoreMap pages, checks it against the
 * root digest, and hands RestoreChunks batches to the writer one by one.
 * Everything a lying or broken appliance could send is bounded: the map may
 * not exceed `maxMapBytes` (nor the target's size, checked by the caller
 * before anything is allocated beyond the geometry), pages must come in
 * order inside the volume with one geometry, and at most `maxQueuedBatches`
 * chunk batches may wait (the appliance's window keeps it far below).
 */
export type RestoreChunks = MessageMap['restoreChunks'];

export interface RestoreImageMap extends ImageGeometry {
  imageId: string;
  volume: string;
  rootDigest: Buffer;
  /** chunkCount × 32 bytes, ZERO for zero chunks. */
  digests: Buffer;
}

/** 1 GiB of digests: 32 Mi chunks, 2 TiB at 64 KiB chunks. */
export const DEFAULT_MAX_MAP_BYTES = 1 << 30;
const MAX_QUEUED_BATCHES = 64;

export class RestoreSession {
  private map: RestoreImageMap | null = null;
  private nextPageIndex = 0;
  private mapDone: { resolve: (m: RestoreImageMap) => void; reject: (e: BlocksnapError) => void } | null = null;
  private readonly mapPromise: Promise<RestoreImageMap>;
  private readonly queue: RestoreChunks[] = [];
  private waiter: { resolve: (b: RestoreChunks) => void; reject: (e: BlocksnapError) => void } | null = null;
  private failure: BlocksnapError | null = null;

  constructor(
    readonly requestId: string,
    private readonly send: (env: Envelope) => Promise<void>,
    private readonly maxMapBytes = DEFAULT_MAX_MAP_BYTES,
  ) {
    this.mapPromise = new Promise((resolve, reject) => (this.mapDone = { resolve, reject }));
    this.mapPromise.catch(() => undefined);
  }

  /** The verified map (its root equals the appliance's root digest). */
  imageMap(): Promise<RestoreImageMap> {
    return this.mapPromise;
  }

  /** Called by the agent for every restore frame of this request. */
  deliver(env: Envelope): void {
    if (this.failure) return;
    try {
      switch (env.kind) {
        case 'restoreMap':
          return this.onMap(env.restoreMap);
        case 'restoreChunks': {
          if (!this.map || this.mapDone) throw new BlocksnapError('E_PROTOCOL', 'restoreChunks before the map was complete');
          if (this.waiter) {
            const w = this.waiter;
            this.waiter = null;
            return w.resolve(env.restoreChunks);
          }
          if (this.queue.length >= MAX_QUEUED_BATCHES) throw new BlocksnapError('E_PROTOCOL', `the appliance sent more than ${MAX_QUEUED_BATCHES} batches ahead of the writes`);
          this.queue.push(env.restoreChunks);
          return;
        }
        case 'restoreEnd': {
          const e = env.restoreEnd;
          return this.fail(e.ok
            ? new BlocksnapError('E_PROTOCOL', 'the appliance ended the restore before it was complete')
            : new BlocksnapError(asCode(e.code), `appliance: ${e.message}`));
        }
        default:
          return;
      }
    } catch (e) {
      this.fail(e as BlocksnapError);
    }
  }

  /** The next chunk batch (in arrival order). */
  nextBatch(): Promise<RestoreChunks> {
    if (this.failure) return Promise.reject(this.failure);
    const b = this.queue.shift();
    if (b) return Promise.resolve(b);
    return new Promise((resolve, reject) => (this.waiter = { resolve, reject }));
  }

  /** Ends the exchange from this side (connection lost, cancelled, a check failed). */
  fail(e: BlocksnapError): void {
    if (this.failure) return;
    this.failure = e;
    this.mapDone?.reject(e);
    this.mapDone = null;
    const w = this.waiter;
    this.waiter = null;
    w?.reject(e);
  }

  get failed(): BlocksnapError | null {
    return this.failure;
  }

  request(imageId: string, changedOnly: boolean): Promise<void> {
    return this.send(envelope('restoreRequest', { requestId: this.requestId, imageId, changedOnly }));
  }

  want(ranges: { first: number; count: number }[], last: boolean): Promise<void> {
    return this.send(envelope('restoreWant', { requestId: this.requestId, ranges, last }));
  }

  ack(seq: number): Promise<void> {
    return this.send(envelope('restoreAck', { requestId: this.requestId, seq }));
  }

  end(ok: boolean, code = '', message = ''): Promise<void> {
    return this.send(envelope('restoreEnd', { requestId: this.requestId, ok, code, message: message.slice(0, 4000) }));
  }

  private onMap(m: MessageMap['restoreMap']): void {
    if (!this.mapDone) throw new BlocksnapError('E_PROTOCOL', 'restoreMap after the map was complete');
    if (!this.map) {
      let g: ImageGeometry;
      try {
        g = imageGeometry(m.volumeSize, m.chunkSize);
      } catch (e) {
        throw new BlocksnapError('E_PROTOCOL', `restoreMap: ${(e as Error).message}`, { cause: e });
      }
      // Before allocating: a lying appliance cannot make the agent reserve more than the bound.
      if (g.chunkCount * DIGEST_BYTES > this.maxMapBytes) {
        throw new BlocksnapError('E_PROTOCOL', `restoreMap: an image of ${g.chunkCount} chunks needs a ${g.chunkCount * DIGEST_BYTES}-byte map, above the ${this.maxMapBytes}-byte bound`);
      }
      this.map = { ...g, imageId: m.imageId, volume: m.volume, rootDigest: Buffer.from(m.rootDigest), digests: Buffer.alloc(g.chunkCount * DIGEST_BYTES) };
    }
    const map = this.map;
    if (m.volumeSize !== map.volumeSize || m.chunkSize !== map.chunkSize || !map.rootDigest.equals(m.rootDigest) || m.imageId !== map.imageId) {
      throw new BlocksnapError('E_PROTOCOL', 'restoreMap: geometry or root changed between pages');
    }
    if (m.digests.length > 0) {
      if (m.firstIndex < this.nextPageIndex) throw new BlocksnapError('E_PROTOCOL', `restoreMap: pages at ${m.firstIndex} go back (next is ${this.nextPageIndex})`);
      const end = m.firstIndex + m.digests.length / DIGEST_BYTES;
      if (end > map.chunkCount) throw new BlocksnapError('E_PROTOCOL', `restoreMap: digests up to chunk ${end} are past the volume end (${map.chunkCount} chunks)`);
      map.digests.set(m.digests, m.firstIndex * DIGEST_BYTES);
      this.nextPageIndex = Math.ceil(end / SLOTS_PER_PAGE) * SLOTS_PER_PAGE;
    }
    if (m.last) {
      const root = imageRootDigest(map.volumeSize, map.chunkSize, map.digests);
      if (!root.equals(map.rootDigest)) {
        throw new BlocksnapError('E_INTEGRITY', `the image map of ${map.imageId} does not hash to its root ${map.rootDigest.toString('hex')} (got ${root.toString('hex')})`);
      }
      const d = this.mapDone;
      this.mapDone = null;
      d.resolve(map);
    }
  }
}

function asCode(code: string): BlocksnapError['code'] {
  return /^E_[A-Z0-9_]+$/.test(code) ? (code as BlocksnapError['code']) : 'E_PROTOCOL';
}
