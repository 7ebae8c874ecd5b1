import { createHmac, randomBytes } from 'node:crypto';
import type { Logger } from 'pino';
import { BlocksnapError, toBlocksnapError } from '../../proto/errors.js';
import { validateEnvelope } from '../../proto/codec.js';
import { isValidChunkSize } from '../../proto/shared/volume-geometry.js';
import { envelope, messageOf, PROTOCOL_VERSION, type AuthProof, type Envelope, type Hello, type VolumeInfo } from '../../proto/messages.js';
import { newNonce, SALT_BYTES, SCRAM_ITERATIONS, serverSignature, verifyClientProof, type ScramExchange, type ScramVerifier } from '../../proto/scram.js';
import type { Transport } from '../../proto/transport.js';
import { CloseCode } from '../../proto/transport.js';
import type { AgentRow } from '../catalog/catalog.js';
import type { AuthGuard } from './auth-guard.js';
import type { JobRouter } from './job-router.js';

export { PROTOCOL_VERSION };
const NAME_RE = /^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$/;
const MAX_VOLUMES = 256;
/** Salts for unknown names: stable per name for this process, so a challenge does not tell whether a name exists. */
const FAKE_SALT_KEY = randomBytes(32);

export interface SessionLimits {
  maxFrameBytes: number;
  windowBytes: number;
  /** Hello to Welcome, whole exchange. */
  authTimeoutMs: number;
  /** Failures count against the source address's bucket. */
  guard?: AuthGuard;
  address?: string;
  /** Ends this connection's authenticating slot (AuthGuard.track); called at Welcome and at close. */
  endPreAuth?: () => void;
}

/**
 * One agent connection, as a state machine (DESIGN.md §4.2):
 * HELLO (only Hello accepted) → PROOF (only AuthProof) → READY (job frames
 * routed to the JobRouter) → CLOSED. A wrong proof or a frame out of place
 * before READY closes the connection; a bad frame of a job aborts that job
 * only. Until READY the transport keeps its pre-authentication bounds.
 */
export class AgentSession {
  readonly id = 'ses-' + randomBytes(6).toString('hex');
  state: 'hello' | 'proof' | 'ready' | 'closed' = 'hello';
  agent: AgentRow | null = null;
  instanceId = '';
  volumes = new Map<string, VolumeInfo>();
  /** Consistency groups the agent announced: name → member volumes (DESIGN.md §4.4). */
  groups = new Map<string, string[]>();
  private readonly authTimer: NodeJS.Timeout;
  private hello: Hello | null = null;
  private exchange: ScramExchange | null = null;
  /** The agent and verifier the challenge came from: a rotate before the proof fails it. */
  private challengedWith: { row: AgentRow; verifier: ScramVerifier } | null = null;
  private readonly endPreAuth: () => void;
  private failureCounted = false;

  constructor(
    readonly transport: Transport,
    private readonly router: JobRouter,
    private readonly log: Logger,
    private readonly limits: SessionLimits,
  ) {
    this.endPreAuth = limits.endPreAuth ?? (() => undefined);
    this.authTimer = setTimeout(() => this.refuse('E_AUTH', 'not authenticated within the time limit'), limits.authTimeoutMs);
    this.authTimer.unref();
    transport.onMessage((env) => this.onEnvelope(env));
    transport.onClose((err) => {
      clearTimeout(this.authTimer);
      // A bad frame or the pre-auth byte budget (a plain disconnect is not held against the source).
      if (err && err.code !== 'E_DISCONNECTED') this.countFailure();
      this.endPreAuth();
      this.state = 'closed';
      // `agent` is set only once the session was ready: its jobs must learn the connection is gone.
      if (this.agent) this.router.sessionClosed(this, err);
      if (this.agent) this.log.info({ session: this.id, agent: this.agent.name, remote: transport.remote, err: err?.code }, 'agent disconnected');
    });
  }

  /** The remote IP address of the connection (an agent's NBD connections must come from it). */
  get address(): string {
    return this.limits.address ?? '';
  }

  send(env: Envelope): void {
    this.transport.send(env).catch((e) => this.log.debug({ err: e, session: this.id }, 'send failed'));
  }

  /**
   * A connection that failed before authenticating (wrong proof, wrong
   * frame, too many bytes, too slow) takes a token from its source's bucket
   * (auth-guard.ts), once: whoever keeps failing is refused at the upgrade.
   */
  private countFailure(): void {
    if (this.failureCounted || this.agent || !this.limits.guard || !this.limits.address) return;
    this.failureCounted = true;
    this.limits.guard.failed(this.limits.address);
  }

  /** Closes the connection with a session-level error. */
  refuse(code: BlocksnapError['code'], message: string): void {
    if (this.state === 'closed') return;
    if (this.state !== 'ready') this.countFailure();
    this.log.warn({ session: this.id, remote: this.transport.remote, code, message }, 'closing agent connection');
    this.transport.send(envelope('error', { jobId: '', code, message })).catch(() => undefined).finally(() => {
      this.transport.close(CloseCode.POLICY_VIOLATION, code);
    });
    this.state = 'closed';
  }

  private onEnvelope(env: Envelope): void {
    if (this.state === 'closed') return;
    if (this.state === 'hello' || this.state === 'proof') {
      const want = this.state === 'hello' ? 'hello' : 'authProof';
      if (env.kind !== want) return this.refuse('E_PROTOCOL', `expected ${want}, got ${env.kind}`);
      try {
        validateEnvelope(env);
      } catch (e) {
        const err = toBlocksnapError(e, 'E_PROTOCOL');
        return this.refuse(err.code, err.message);
      }
      return env.kind === 'hello' ? this.onHello(env.hello) : this.onProof((env as { authProof: AuthProof }).authProof);
    }
    if (env.kind === 'ping') return this.send(envelope('pong', env.ping));
    if (env.kind === 'hello' || env.kind === 'authProof') return this.refuse('E_PROTOCOL', `${env.kind} after authentication`);
    try {
      validateEnvelope(env);
    } catch (e) {
      // A malformed job frame aborts that job only; anything else ends the session.
      const err = toBlocksnapError(e, 'E_PROTOCOL');
      const jobId = (messageOf(env) as { jobId?: unknown }).jobId;
      if (typeof jobId === 'string' && jobId && this.router.failOwnJob(this, jobId, err)) return;
      return this.refuse(err.code, err.message);
    }
    try {
      this.router.onAgentFrame(this, env);
    } catch (e) {
      const err = toBlocksnapError(e);
      this.refuse(err.code, err.message);
    }
  }

  /**
   * Hello: answer a challenge. An unknown name (or one without a usable
   * credential) gets a made-up one and fails at the proof, like a wrong
   * secret. An agent whose stored credential predates SCRAM cannot answer
   * any challenge: it is told to have its token rotated.
   */
  private onHello(h: Hello): void {
    if (h.protocolVersion !== PROTOCOL_VERSION) {
      return this.refuse('E_PROTOCOL', `protocol version ${h.protocolVersion} not supported (appliance speaks ${PROTOCOL_VERSION})`);
    }
    const found = NAME_RE.test(h.agent) ? this.router.catalog.credential(h.agent) : undefined;
    if (found?.credential.kind === 'legacy') {
      return this.refuse('E_AUTH', `agent ${h.agent} has a credential from an older version that cannot do challenge-response: ` +
        `run \`blocksnap-appliance agents rotate ${h.agent}\` and give the agent the new token`);
    }
    let salt: Buffer;
    let iterations: number;
    if (found?.credential.kind === 'scram') {
      const v = found.credential.verifier;
      ({ salt, iterations } = v);
      this.challengedWith = { row: found.agent, verifier: v };
    } else {
      salt = createHmac('sha256', FAKE_SALT_KEY).update(h.agent).digest().subarray(0, SALT_BYTES);
      iterations = SCRAM_ITERATIONS;
    }
    this.hello = h;
    this.exchange = { agent: h.agent, clientNonce: h.clientNonce, serverNonce: newNonce(), salt, iterations, protocolVersion: PROTOCOL_VERSION };
    this.state = 'proof';
    this.send(envelope('authChallenge', { salt, iterations, serverNonce: this.exchange.serverNonce }));
  }

  private onProof(p: AuthProof): void {
    const x = this.exchange!;
    const c = this.challengedWith;
    // Re-read: an `agents rotate` since the challenge makes the old secret useless at once.
    const now = c ? this.router.catalog.credential(c.row.name)?.credential : undefined;
    const unchanged = now?.kind === 'scram' && now.verifier.storedKey.equals(c!.verifier.storedKey);
    if (!c || !unchanged || !verifyClientProof(c.verifier, x, p.clientProof)) {
      return this.refuse('E_AUTH', 'unknown agent or wrong token');
    }
    clearTimeout(this.authTimer);
    const h = this.hello!;
    const agent = c.row;
    if (h.volumes.length > MAX_VOLUMES) return this.refuse('E_PROTOCOL', `too many volumes (${h.volumes.length})`);
    for (const v of h.volumes) {
      if (!NAME_RE.test(v.name) || !(v.size > 0) || !Number.isSafeInteger(v.size) || !isValidChunkSize(v.chunkSize)) {
        return this.refuse('E_PROTOCOL', `invalid volume in inventory: ${JSON.stringify(v.name)}`);
      }
      this.volumes.set(v.name, v);
    }
    const memberOf = new Map<string, string>();
    for (const g of h.groups ?? []) {
      if (!NAME_RE.test(g.name) || this.volumes.has(g.name) || this.groups.has(g.name)) {
        return this.refuse('E_PROTOCOL', `invalid group in inventory: ${JSON.stringify(g.name)} (a bad name, a volume's name, or listed twice)`);
      }
      for (const v of g.volumes) {
        if (!this.volumes.has(v) || memberOf.has(v)) {
          return this.refuse('E_PROTOCOL', `group ${g.name}: ${JSON.stringify(v)} is not a volume of the inventory, or is in two groups`);
        }
        memberOf.set(v, g.name);
      }
      this.groups.set(g.name, [...g.volumes]);
    }
    this.agent = agent;
    this.instanceId = h.instanceId;
    this.state = 'ready';
    this.hello = null;
    this.endPreAuth();
    this.transport.authenticated?.();
    for (const v of this.volumes.values()) this.router.catalog.upsertVolume(agent.id, v.name, v.size, v.chunkSize);
    this.send(envelope('welcome', {
      sessionId: this.id, maxFrameBytes: this.limits.maxFrameBytes, windowBytes: this.limits.windowBytes,
      serverSignature: serverSignature(c.verifier.serverKey, x),
    }));
    this.log.info({ session: this.id, agent: agent.name, remote: this.transport.remote, volumes: [...this.volumes.keys()] }, 'agent connected');
    this.router.sessionReady(this);
  }
}
