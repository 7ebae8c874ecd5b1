import { mkdirSync } from 'node:fs';
import { join } from 'node:path';
import type { Logger } from 'pino';
import { BlocksnapError } from '../proto/errors.js';
import { ControlSocketServer, controlRequest, socketAnswers, type ControlRoutes } from '../proto/shared/control-socket.js';
import type { AuditResult } from './audit/audit-run.js';
import type { Validity } from './cbt/tracker.js';
import type { AgentMounts } from './agent-mounts.js';
import { mountRoutes } from './mount-control.js';
import type { RestoreProgress, RestoreRequestOptions, RestoreResult } from './restore/restore-run.js';

/**
 * The agent CLI's way into the running agent, which alone holds the live
 * trackers: HTTP over the Unix socket `STATE/agent.sock`, mode 0600 (only
 * the agent's own user may freeze volumes through it). Works without the
 * appliance.
 *
 *   GET  /v1/status            → AgentStatus
 *   POST /v1/mount, POST /v1/unmount, GET /v1/mounts: instant mounts (agent/mount-control.ts)
 *   POST /v1/audit {volume}    → AuditResult (when the client goes away, the audit is cancelled)
 *   POST /v1/restore {image, target, changedOnly, force} → NDJSON progress events, then RestoreResult
 *   errors                     → 4xx/5xx {event: 'error', code, message} (proto/shared/control-socket)
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
  /** Instant mounts (agent/mount-control.ts routes). */
  readonly mounts?: AgentMounts;
  status(): AgentStatus;
  auditVolume(name: string, signal?: AbortSignal): Promise<AuditResult>;
  restoreImage?(req: RestoreRequestOptions, signal?: AbortSignal, onProgress?: (p: RestoreProgress) => void): Promise<RestoreResult>;
}

export const agentSocketPath = (stateDir: string) => join(stateDir, 'agent.sock');

export class AgentControlServer {
  private constructor(private readonly server: ControlSocketServer) {}

  /**
   * Listens on STATE/agent.sock. A socket that still answers belongs to a
   * live agent on the same state directory: E_BUSY (two agents would fight
   * over snapshots and bitmaps). One that does not is stale and replaced.
   */
  static async listen(stateDir: string, agent: ControlledAgent, log: Logger): Promise<AgentControlServer> {
    const path = agentSocketPath(stateDir);
    mkdirSync(stateDir, { recursive: true, mode: 0o700 });
    if (await socketAnswers(path)) throw new BlocksnapError('E_BUSY', `another agent is running on state directory ${stateDir} (${path} answers)`);
    return new AgentControlServer(await ControlSocketServer.listen(path, routes(agent), log));
  }

  close(): Promise<void> {
    return this.server.close();
  }
}

function routes(agent: ControlledAgent): ControlRoutes {
  return {
    ...mountRoutes(agent.mounts),
    'GET /v1/status': () => agent.status(),
    'POST /v1/audit': ({ body, signal }) => {
      if (typeof body.volume !== 'string' || body.volume === '') throw new BlocksnapError('E_USAGE', '"volume" is required');
      return agent.auditVolume(body.volume, signal); // the client going away cancels the audit
    },
    // Restore (DESIGN.md §4.6): NDJSON progress events, then the result; the client going away cancels it.
    'POST /v1/restore': async ({ body, signal, events }) => {
      if (!agent.restoreImage) throw new BlocksnapError('E_USAGE', 'this agent cannot restore');
      if (typeof body.image !== 'string' || body.image === '' || typeof body.target !== 'string' || body.target === '') {
        throw new BlocksnapError('E_USAGE', '"image" and "target" are required');
      }
      const emit = events();
      return agent.restoreImage({ imageId: body.image, target: body.target, changedOnly: body.changedOnly === true, force: body.force === true },
        signal, (p) => emit({ event: 'progress', ...p }));
    },
  };
}

/**
 * Client side (the CLI): one request to the running agent of `stateDir`.
 * No socket, or nobody listening on it: E_NOT_FOUND. An error answer is
 * rethrown with the agent's code.
 */
export function callAgent<T>(stateDir: string, method: 'GET' | 'POST', path: string, body?: object): Promise<T> {
  const socketPath = agentSocketPath(stateDir);
  return controlRequest<T>(socketPath, method, path, body, {
    notRunning: (e) => new BlocksnapError('E_NOT_FOUND', `no agent running for state dir ${stateDir} (nothing answers on ${socketPath}; start it with: blocksnap-agent run)`, { cause: e }),
  });
}
