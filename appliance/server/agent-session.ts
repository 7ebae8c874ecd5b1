import { randomBytes } from 'node:crypto';
import type { Logger } from 'pino';
import { BlocksnapError, toBlocksnapError } from '../../proto/errors.js';
import { validateEnvelope } from '../../proto/codec.js';
import { envelope, messageOf, type Envelope, type Hello, type VolumeInfo } from '../../proto/messages.js';
import type { Transport } from '../../proto/transport.js';
import { CloseCode } from '../../proto/transport.js';
import type { AgentRow } from '../catalog/catalog.js';
import type { JobRouter } from './job-router.js';

export const PROTOCOL_VERSION = 1;
const NAME_RE = /^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$/;
const MAX_VOLUMES = 256;

/**
 * One agent connection, as a state machine (DESIGN.md §4.2):
 * AUTH (only Hello accepted) → READY (job frames routed to the JobRouter)
 * → CLOSED. A wrong credential or a frame out of place before READY closes
 * the connection; a bad frame of a job aborts that job only.
 */
export class AgentSession {
  readonly id = 'ses-' + randomBytes(6).toString('hex');
  state: 'auth' | 'ready' | 'closed' = 'auth';
  agent: AgentRow | null = null;
  instanceId = '';
  volumes = new Map<string, VolumeInfo>();
  /** Consistency groups the agent announced: name → member volumes (DESIGN.md §4.4). */
  groups = new Map<string, string[]>();
  private readonly authTimer: NodeJS.Timeout;

  constructor(
    readonly transport: Transport,
    private readonly router: JobRouter,
    private readonly log: Logger,
    private readonly limits: { maxFrameBytes: number; windowBytes: number; authTimeoutMs: number },
  ) {
    this.authTimer = setTimeout(() => this.refuse('E_AUTH', 'no Hello within the time limit'), limits.authTimeoutMs);
    this.authTimer.unref();
    transport.onMessage((env) => this.onEnvelope(env));
    transport.onClose((err) => {
      clearTimeout(this.authTimer);
      this.state = 'closed';
      // `agent` is set only once the session was ready: its jobs must learn the connection is gone.
      if (this.agent) this.router.sessionClosed(this, err);
      this.log.info({ session: this.id, agent: this.agent?.name, remote: transport.remote, err: err?.code }, 'agent disconnected');
    });
  }

  send(env: Envelope): void {
    this.transport.send(env).catch((e) => this.log.debug({ err: e, session: this.id }, 'send failed'));
  }

  /** Closes the connection with a session-level error. */
  refuse(code: BlocksnapError['code'], message: string): void {
    if (this.state === 'closed') return;
    this.log.warn({ session: this.id, remote: this.transport.remote, code, message }, 'closing agent connection');
    this.transport.send(envelope('error', { jobId: '', code, message })).catch(() => undefined).finally(() => {
      this.transport.close(CloseCode.POLICY_VIOLATION, code);
    });
    this.state = 'closed';
  }

  private onEnvelope(env: Envelope): void {
    if (this.state === 'closed') return;
    if (this.state === 'auth') {
      if (env.kind !== 'hello') return this.refuse('E_PROTOCOL', `expected hello, got ${env.kind}`);
      try {
        validateEnvelope(env);
      } catch (e) {
        const err = toBlocksnapError(e, 'E_PROTOCOL');
        return this.refuse(err.code, err.message);
      }
      return this.onHello(env.hello);
    }
    if (env.kind === 'ping') return this.send(envelope('pong', env.ping));
    if (env.kind === 'hello') return this.refuse('E_PROTOCOL', 'hello sent twice');
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

  private onHello(h: Hello): void {
    clearTimeout(this.authTimer);
    if (h.protocolVersion !== PROTOCOL_VERSION) {
      return this.refuse('E_PROTOCOL', `protocol version ${h.protocolVersion} not supported (appliance speaks ${PROTOCOL_VERSION})`);
    }
    const agent = NAME_RE.test(h.agent) ? this.router.catalog.authenticate(h.agent, h.token) : undefined;
    if (!agent) return this.refuse('E_AUTH', 'unknown agent or wrong token');
    if (h.volumes.length > MAX_VOLUMES) return this.refuse('E_PROTOCOL', `too many volumes (${h.volumes.length})`);
    for (const v of h.volumes) {
      const cs = v.chunkSize;
      if (!NAME_RE.test(v.name) || !(v.size > 0) || !Number.isSafeInteger(v.size) || cs < 4096 || cs > 4 << 20 || (cs & (cs - 1)) !== 0) {
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
    for (const v of this.volumes.values()) this.router.catalog.upsertVolume(agent.id, v.name, v.size, v.chunkSize);
    this.send(envelope('welcome', { sessionId: this.id, maxFrameBytes: this.limits.maxFrameBytes, windowBytes: this.limits.windowBytes }));
    this.log.info({ session: this.id, agent: agent.name, remote: this.transport.remote, volumes: [...this.volumes.keys()] }, 'agent connected');
    this.router.sessionReady(this);
  }
}
