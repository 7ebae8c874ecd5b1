/**
 * A fake agent for appliance tests: it speaks the real protocol (frame codec,
 * protobuf envelopes) over a real WebSocket, but every step is scripted by
 * the test, so a test can send exactly the wrong thing at the wrong moment.
 * It sits on `ws` directly rather than on the proto Transport because tests
 * must also send what a Transport refuses to (text, garbage, lying lengths)
 * and observe the close code the appliance chose.
 */
import { createHash, randomBytes } from 'node:crypto';
import { readdir, readFile, rm } from 'node:fs/promises';
import { join } from 'node:path';
import { WebSocket } from 'ws';
import binding from 'zstd-napi/binding.js';
import { decodeSingleFrame, encodeFrame } from '../../proto/codec.js';
import {
  envelope, JobMode, type BeginVolume, type Chunk, type Envelope, type EnvelopeKind, type Hello, type MessageMap,
} from '../../proto/messages.js';
import { exportImage } from '../ops/export-image.js';
import { PROTOCOL_VERSION } from '../server/agent-session.js';
import { listManifests, readManifest } from '../store/manifest.js';
import { zstdCompress } from '../../proto/shared/zstd.js';
import { ScramClient } from '../../proto/scram.js';
import { imageRootDigest } from '../../proto/shared/image-root.js';
import type { Appliance } from '../server/appliance.js';

/** What the assertions below read of an appliance (scripts/lab/appliance-harness.ts gives one). */
export interface ApplianceView { app: Appliance; dataDir: string }

/** A volume held in memory: what the fake agent "snapshots". */
export interface TestVolume { name: string; size: number; chunkSize: number; data: Buffer }

/** Random content (so no chunk dedups against an earlier test), the listed chunks all-zero. */
export function makeVolume(name: string, size: number, chunkSize: number, zeroChunks: number[] = []): TestVolume {
  const v = { name, size, chunkSize, data: randomBytes(size) };
  for (const i of zeroChunks) plainOf(v, i).fill(0);
  return v;
}

/** A copy of `v` whose listed chunks got new random content. */
export function mutateVolume(v: TestVolume, chunks: number[]): TestVolume {
  const next = { ...v, data: Buffer.from(v.data) };
  for (const i of chunks) randomBytes(plainOf(next, i).length).copy(plainOf(next, i));
  return next;
}

export const chunkCountOf = (v: TestVolume): number => Math.ceil(v.size / v.chunkSize);

/** The chunk's bytes (a view into `v.data`; the last one may be short). */
export function plainOf(v: TestVolume, i: number): Buffer {
  return v.data.subarray(i * v.chunkSize, Math.min((i + 1) * v.chunkSize, v.size));
}

export const sha256 = (b: Uint8Array): Buffer => createHash('sha256').update(b).digest();

/** The chunk as an honest agent sends it: zstd + SHA-256, or zero=true without data. */
export function goodChunk(v: TestVolume, i: number): Chunk {
  const plain = plainOf(v, i);
  if (plain.every((b) => b === 0)) return { index: i, digest: Buffer.alloc(0), zero: true, data: Buffer.alloc(0), plainLength: plain.length };
  return { index: i, digest: sha256(plain), zero: false, data: zstdCompress(plain), plainLength: plain.length };
}

/** SHA-256 of the image root of `v` (DESIGN.md §3.3): what an honest agent sends in EndVolume. */
export function expectedRootOf(v: TestVolume): Buffer {
  const n = chunkCountOf(v);
  const digests = Buffer.alloc(n * 32);
  for (let i = 0; i < n; i++) {
    const plain = plainOf(v, i);
    if (!plain.every((b) => b === 0)) sha256(plain).copy(digests, i * 32);
  }
  return imageRootDigest(v.size, v.chunkSize, digests);
}

export function nonZeroIndexes(v: TestVolume): number[] {
  return Array.from({ length: chunkCountOf(v) }, (_, i) => i).filter((i) => !plainOf(v, i).every((b) => b === 0));
}

/**
 * A zstd frame of `plain` whose header does not declare the content size,
 * so only a bounded decoder notices how much it really holds (a zstd bomb
 * when `plain` is large and compressible).
 */
export function zstdWithoutSize(plain: Uint8Array): Buffer {
  const cctx = new binding.CCtx();
  cctx.setParameter(binding.CParameter.contentSizeFlag, 0);
  const out = Buffer.alloc(binding.compressBound(plain.length));
  return Buffer.from(out.subarray(0, cctx.compress2(out, plain)));
}

type Waiter = { kind: EnvelopeKind; jobId?: string; resolve: (e: Envelope) => void; reject: (e: Error) => void };

export class ScriptedAgent {
  /** Envelopes received and not yet taken by `next`. */
  readonly inbox: Envelope[] = [];
  /** Resolves with the close code and reason once the socket is closed (by either side). */
  readonly closed: Promise<{ code: number; reason: string }>;
  private readonly waiters: Waiter[] = [];
  private closeInfo: { code: number; reason: string } | null = null;
  private seq = 0;
  /** Frames from the appliance this agent could not decode (must stay empty). */
  readonly protocolErrors: string[] = [];
  /** The SCRAM side of the last `sendHello`; with `autoAuth`, an AuthChallenge is answered at once. */
  scram: ScramClient | null = null;
  autoAuth = true;

  private constructor(
    private readonly ws: WebSocket,
    /** Hello.instanceId: the same value on a reconnect means "the same agent process". */
    readonly instanceId: string,
  ) {
    ws.on('message', (data, isBinary) => this.received(data as Buffer, isBinary));
    ws.on('error', () => undefined); // a refused peer shows as the close code
    this.closed = new Promise((resolve) => ws.once('close', (code, reason) => {
      this.closeInfo = { code, reason: reason.toString() };
      for (const w of this.waiters.splice(0)) w.reject(new Error(`connection closed (${code} ${reason}) while waiting for ${w.kind}`));
      resolve(this.closeInfo);
    }));
  }

  /** `localAddress`: the source address (any 127.x.y.z reaches lo), to test per-source limits. */
  static async connect(url: string, instanceId = 'ins-' + randomBytes(6).toString('hex'), opts: { localAddress?: string; ca?: Buffer } = {}): Promise<ScriptedAgent> {
    const ws = new WebSocket(url, { perMessageDeflate: false, ...(opts.localAddress ? { localAddress: opts.localAddress } : {}), ...(opts.ca ? { ca: opts.ca } : {}) });
    const agent = new ScriptedAgent(ws, instanceId);
    await new Promise<void>((resolve, reject) => {
      ws.once('open', () => resolve());
      ws.once('error', reject);
    });
    return agent;
  }

  get isOpen(): boolean {
    return this.ws.readyState === WebSocket.OPEN;
  }

  send(env: Envelope): Promise<void> {
    return this.sendRaw(encodeFrame(env, Number.MAX_SAFE_INTEGER));
  }

  /** Sends one WebSocket message as is: a Buffer as binary, a string as text. */
  sendRaw(message: Buffer | string): Promise<void> {
    return new Promise((resolve, reject) => {
      this.ws.send(message, { binary: typeof message !== 'string', compress: false }, (e) => (e ? reject(e) : resolve()));
    });
  }

  /**
   * The next envelope of `kind` (for `jobId` if given), from the inbox or
   * when it arrives. Rejects early, naming it, when the appliance answers an
   * Error for that job (or for the session) instead, or closes the socket.
   */
  next<K extends EnvelopeKind>(kind: K, jobId?: string, timeoutMs = 5000): Promise<MessageMap[K]> {
    const hit = this.inbox.findIndex((e) => matches(e, kind, jobId));
    if (hit >= 0) return Promise.resolve(messageOf(this.inbox.splice(hit, 1)[0]!, kind));
    const early = this.inbox.find((e) => kind !== 'error' && isErrorFor(e, jobId));
    if (early) return Promise.reject(unexpected(kind, early));
    if (this.closeInfo) return Promise.reject(new Error(`connection closed (${this.closeInfo.code}) before ${kind}`));
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.waiters.splice(this.waiters.indexOf(w), 1);
        reject(new Error(`no ${kind}${jobId ? ` for ${jobId}` : ''} within ${timeoutMs} ms`));
      }, timeoutMs);
      const w: Waiter = {
        kind, jobId,
        resolve: (e) => { clearTimeout(timer); resolve(messageOf(e, kind)); },
        reject: (e) => { clearTimeout(timer); reject(e); },
      };
      this.waiters.push(w);
    });
  }

  /**
   * Sends Hello; fields in `patch` override the honest ones. `token` is the
   * secret this agent proves (SCRAM): with `autoAuth` the appliance's
   * AuthChallenge is answered by itself (the challenge stays in the inbox).
   */
  sendHello(agent: string, token: string, volumes: TestVolume[], patch: Partial<Hello> = {}): Promise<void> {
    this.scram = new ScramClient(agent, token, PROTOCOL_VERSION);
    return this.send(envelope('hello', {
      agent, clientNonce: this.scram.clientNonce, protocolVersion: PROTOCOL_VERSION, agentVersion: 'scripted', instanceId: this.instanceId,
      volumes: volumes.map((v) => ({ name: v.name, size: v.size, chunkSize: v.chunkSize, lastImageId: '' })),
      ...patch,
    }));
  }

  /** Hello, the challenge answered, then waits for Welcome and checks the appliance's signature. */
  async login(agent: string, token: string, volumes: TestVolume[]): Promise<MessageMap['welcome']> {
    await this.sendHello(agent, token, volumes);
    const welcome = await this.next('welcome');
    this.scram!.checkWelcome(welcome);
    return welcome;
  }

  begin(jobId: string, v: TestVolume, patch: Partial<BeginVolume> = {}): Promise<void> {
    this.seq = 0;
    return this.send(envelope('beginVolume', {
      jobId, volume: v.name, volumeSize: v.size, chunkSize: v.chunkSize, basisImageId: '', mode: JobMode.FULL, resume: false, ...patch,
    }));
  }

  /** Sends a batch; `seq` defaults to the next one of this job. */
  batch(jobId: string, chunks: Chunk[], seq = this.seq + 1): Promise<void> {
    this.seq = seq;
    return this.send(envelope('chunkBatch', { jobId, seq, chunks }));
  }

  /** EndVolume claiming the image `v` (its root), a given root, or (neither) a root no image has. */
  end(jobId: string, nextIndex: number, image?: TestVolume | Uint8Array): Promise<void> {
    const expectedRoot = image === undefined ? Buffer.alloc(32, 0xee) : image instanceof Uint8Array ? image : expectedRootOf(image);
    return this.send(envelope('endVolume', { jobId, nextIndex, expectedRoot }));
  }

  result(jobId: string, ok: boolean, imageId = '', errorCode = ''): Promise<void> {
    return this.send(envelope('jobResult', { jobId, ok, imageId, errorCode, errorMessage: ok ? '' : 'scripted failure' }));
  }

  /** A round trip: proves the appliance still serves this connection. */
  async ping(): Promise<void> {
    const nonce = Math.floor(Math.random() * 1e9);
    await this.send(envelope('ping', { nonce }));
    const pong = await this.next('pong');
    if (pong.nonce !== nonce) throw new Error(`pong ${pong.nonce} for ping ${nonce}`);
  }

  /**
   * What an honest agent does after RunJob: begin, send the chunks in
   * batches (every non-zero chunk, or only `changed` when the basis is
   * accepted), wait for each Ack, end, wait for Committed, report success.
   */
  async transfer(jobId: string, v: TestVolume, opts: { basisImageId?: string; changed?: number[]; batchChunks?: number } = {}) {
    const incremental = opts.basisImageId !== undefined;
    await this.begin(jobId, v, { mode: incremental ? JobMode.INCREMENTAL : JobMode.FULL, basisImageId: opts.basisImageId ?? '' });
    const ready = await this.next('volumeReady', jobId);
    const indexes = ready.basisAccepted && opts.changed ? opts.changed : nonZeroIndexes(v);
    const per = opts.batchChunks ?? 4;
    for (let i = 0; i < indexes.length; i += per) {
      await this.batch(jobId, indexes.slice(i, i + per).map((n) => goodChunk(v, n)));
      await this.next('ack', jobId);
    }
    await this.end(jobId, chunkCountOf(v), v);
    const committed = await this.next('committed', jobId);
    await this.result(jobId, true, committed.imageId);
    return { ready, committed };
  }

  close(): Promise<{ code: number; reason: string }> {
    if (this.ws.readyState === WebSocket.OPEN || this.ws.readyState === WebSocket.CONNECTING) this.ws.close(1000);
    return this.closed;
  }

  private received(data: Buffer, isBinary: boolean): void {
    let env: Envelope;
    try {
      if (!isBinary) throw new Error('a text message');
      env = decodeSingleFrame(data, Number.MAX_SAFE_INTEGER);
    } catch (e) {
      // The appliance broke the protocol: make every wait fail loudly.
      this.ws.close(1002, 'scripted agent: bad frame from the appliance');
      this.protocolErrors.push(String(e));
      return;
    }
    if (env.kind === 'authChallenge' && this.autoAuth && this.scram) {
      this.scram.proof(env.authChallenge).then((p) => this.send(envelope('authProof', p))).catch((e) => this.protocolErrors.push(String(e)));
    }
    const w = this.waiters.find((x) => matches(env, x.kind, x.jobId));
    if (w) {
      this.waiters.splice(this.waiters.indexOf(w), 1);
      return w.resolve(env);
    }
    this.inbox.push(env);
    for (const x of this.waiters.filter((x) => x.kind !== 'error' && isErrorFor(env, x.jobId))) {
      this.waiters.splice(this.waiters.indexOf(x), 1);
      x.reject(unexpected(x.kind, env));
    }
  }
}

function jobIdOf(env: Envelope): string | undefined {
  return (env as unknown as Record<string, { jobId?: string }>)[env.kind]?.jobId;
}

function matches(env: Envelope, kind: EnvelopeKind, jobId?: string): boolean {
  return env.kind === kind && (jobId === undefined || jobIdOf(env) === jobId);
}

function isErrorFor(env: Envelope, jobId?: string): boolean {
  return env.kind === 'error' && (env.error.jobId === '' || jobId === undefined || env.error.jobId === jobId);
}

function messageOf<K extends EnvelopeKind>(env: Envelope, kind: K): MessageMap[K] {
  return (env as unknown as Record<string, MessageMap[K]>)[kind]!;
}

function unexpected(kind: EnvelopeKind, env: Envelope): Error {
  const e = messageOf(env, 'error');
  return new Error(`waiting for ${kind}: the appliance sent Error ${e.code} (job ${e.jobId || '-'}): ${e.message}`);
}

// ---- what the appliance shows, for the tests' assertions ------------------

/** Everything the appliance shows of a job: its catalog row, the images and manifests naming it, and store/tmp. */
export async function jobTrace(h: ApplianceView, jobId: string) {
  const storeDir = join(h.dataDir, 'store');
  const manifests: string[] = [];
  for (const id of await listManifests(storeDir)) if ((await readManifest(storeDir, id)).jobId === jobId) manifests.push(id);
  return {
    row: h.app.catalog.job(jobId),
    images: h.app.catalog.listImages().filter((i) => i.jobId === jobId).map((i) => i.id),
    manifests,
    tmp: await readdir(join(storeDir, 'tmp')),
  };
}

/** The image's virtual full, read back through the store (every chunk re-hashed). */
export async function imageBytes(h: ApplianceView, imageId: string): Promise<Buffer> {
  const img = h.app.catalog.image(imageId);
  if (!img) throw new Error(`no image ${imageId} in the catalog`);
  const out = join(h.dataDir, `export-${imageId}.raw`);
  await exportImage(h.app.store, img.rootDigest, out);
  try {
    return await readFile(out);
  } finally {
    await rm(out, { force: true });
  }
}
