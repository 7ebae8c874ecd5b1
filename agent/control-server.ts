import { mkdirSync, chmodSync, rmSync } from 'node:fs';
import { createServer, request, type IncomingMessage, type Server, type ServerResponse } from 'node:http';
import { connect } from 'node:net';
import { join } from 'node:path';
import type { Logger } from 'pino';
import { BlocksnapError, ErrorCodes, toBlocksnapError, type ErrorCode } from '../proto/errors.js';
import type { AuditResult } from './audit/audit-run.js';
import type { Validity } from './cbt/tracker.js';
import { readJsonBody } from '../proto/shared/http-json.js';

/**
 * The agent CLI's way into the running agent, which alone holds the live
 * trackers: HTTP over the Unix socket `STATE/agent.sock`, mode 0600 (only
 * the agent's own user may freeze volumes through it). Works without the
 * appliance.
 *
 *   GET  /v1/status            → AgentStatus
 *   POST /v1/audit {volume}    → AuditResult (when the client goes away, the audit is cancelled)
 *   errors                     → 4xx/5xx {code, message}
 */
export interface VolumeStatus {
  name: string;
  device: string;
  mountpoint: string;
  chunkSize: number;
  /** What holds the volume now ('job <id>', 'an audit'), or null. */
  busy: string | null;
  /** null when the volume is not tracked (tracking off, or its tracker failed to start). */
  tracking: { validity: Validity; generation: number; basisImageId: string | null } | null;
}

export interface AgentStatus {
  agent: string;
  version: string;
  pid: number;
  connected: boolean;
  /** The config's `tracking` (a tracker of agent/compose.ts's registry). */
  trackingMode: string;
  volumes: VolumeStatus[];
}

export interface ControlledAgent {
  status(): AgentStatus;
  auditVolume(name: string, signal?: AbortSignal): Promise<AuditResult>;
}

export const agentSocketPath = (stateDir: string) => join(stateDir, 'agent.sock');

export class AgentControlServer {
  private constructor(private readonly http: Server, private readonly path: string) {}

  /**
   * Listens on STATE/agent.sock. A socket that still answers belongs to a
   * live agent on the same state directory: E_BUSY (two agents would fight
   * over snapshots and bitmaps). One that does not is stale and replaced.
   */
  static async listen(stateDir: string, agent: ControlledAgent, log: Logger): Promise<AgentControlServer> {
    const path = agentSocketPath(stateDir);
    mkdirSync(stateDir, { recursive: true, mode: 0o700 });
    if (await answers(path)) throw new BlocksnapError('E_BUSY', `another agent is running on state directory ${stateDir} (${path} answers)`);
    rmSync(path, { force: true });
    const http = createServer((req, res) => {
      handle(agent, req, res).catch((e) => {
        const err = toBlocksnapError(e);
        log.warn({ code: err.code, message: err.message, url: req.url }, 'control request failed');
        if (!res.headersSent) res.writeHead(httpStatus(err.code), { 'content-type': 'application/json' });
        res.end(JSON.stringify({ code: err.code, message: err.message }) + '\n');
      });
    });
    await new Promise<void>((resolve, reject) => {
      http.once('error', (e) => reject(new BlocksnapError('E_CONFIG', `cannot listen on ${path}: ${e.message}`, { cause: e })));
      http.listen(path, () => resolve());
    });
    chmodSync(path, 0o600);
    return new AgentControlServer(http, path);
  }

  async close(): Promise<void> {
    this.http.closeAllConnections();
    await new Promise<void>((resolve) => this.http.close(() => resolve()));
    rmSync(this.path, { force: true });
  }
}

async function handle(agent: ControlledAgent, req: IncomingMessage, res: ServerResponse): Promise<void> {
  const url = req.url ?? '';
  if (req.method === 'GET' && url === '/v1/status') return json(res, agent.status());
  if (req.method === 'POST' && url === '/v1/audit') {
    const body = await readJsonBody(req);
    if (typeof body.volume !== 'string' || body.volume === '') throw new BlocksnapError('E_USAGE', '"volume" is required');
    const abort = new AbortController();
    res.once('close', () => {
      if (!res.writableFinished) abort.abort(new BlocksnapError('E_CANCELLED', 'the client went away'));
    });
    return json(res, await agent.auditVolume(body.volume, abort.signal));
  }
  throw new BlocksnapError('E_NOT_FOUND', `no such control endpoint ${req.method} ${url}`);
}

function json(res: ServerResponse, v: unknown): void {
  res.writeHead(200, { 'content-type': 'application/json' }).end(JSON.stringify(v) + '\n');
}

function httpStatus(code: ErrorCode): number {
  if (code === 'E_NOT_FOUND' || code === 'E_UNKNOWN_VOLUME') return 404;
  if (code === 'E_BUSY') return 409;
  if (code === 'E_USAGE') return 400;
  return 500;
}


/** True if something accepts connections on the Unix socket `path`. */
function answers(path: string): Promise<boolean> {
  return new Promise((resolve) => {
    const s = connect(path);
    s.once('connect', () => {
      s.destroy();
      resolve(true);
    });
    s.once('error', () => resolve(false));
  });
}

/**
 * Client side (the CLI): one request to the running agent of `stateDir`.
 * No socket, or nobody listening on it: E_NOT_FOUND. An error answer is
 * rethrown with the agent's code.
 */
export function callAgent<T>(stateDir: string, method: 'GET' | 'POST', path: string, body?: object): Promise<T> {
  const socketPath = agentSocketPath(stateDir);
  return new Promise((resolve, reject) => {
    const req = request({ socketPath, path, method, headers: { 'content-type': 'application/json' } }, (res) => {
      const parts: Buffer[] = [];
      res.on('data', (c: Buffer) => parts.push(c));
      res.on('error', (e) => reject(new BlocksnapError('E_DISCONNECTED', `agent control socket: ${e.message}`, { cause: e })));
      res.on('end', () => {
        let v: any;
        try {
          v = JSON.parse(Buffer.concat(parts).toString('utf8'));
        } catch (e) {
          return reject(new BlocksnapError('E_PROTOCOL', 'the agent answered garbage', { cause: e }));
        }
        if (res.statusCode === 200) return resolve(v as T);
        const code = typeof v?.code === 'string' && Object.hasOwn(ErrorCodes, v.code) ? (v.code as ErrorCode) : 'E_INTERNAL';
        reject(new BlocksnapError(code, String(v?.message ?? `HTTP ${res.statusCode}`)));
      });
    });
    req.on('error', (e: NodeJS.ErrnoException) => {
      if (e.code === 'ENOENT' || e.code === 'ECONNREFUSED') {
        reject(new BlocksnapError('E_NOT_FOUND', `no agent running for state dir ${stateDir} (nothing answers on ${socketPath}; start it with: blocksnap-agent run)`, { cause: e }));
      } else {
        reject(new BlocksnapError('E_DISCONNECTED', `agent control socket ${socketPath}: ${e.message}`, { cause: e }));
      }
    });
    req.end(body === undefined ? undefined : JSON.stringify(body));
  });
}
