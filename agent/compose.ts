/**
 * Where the agent's ports get their implementations (DESIGN.md §7): the CLI
 * composes here, test fixtures too. Adding a snapshot provider, a tracker or
 * a quiescer is one new folder and one line in a map below; the config keys
 * `provider`, `tracking` and `quiescer` name an entry (config.ts checks the
 * names against the registry it is given).
 */
import type { Logger } from 'pino';
import { connectWs } from '../proto/ws-transport.js';
import { BlocksnapError } from '../proto/errors.js';
import { Agent, type AgentHooks } from './agent.js';
import { connectionOf } from './capture.js';
import { cleanupStaleInstances } from './cbt/tracefs/tracefs-instance.js';
import { TracefsTracker } from './cbt/tracefs/tracefs-tracker.js';
import { ThinDeltaTracker, cleanupStaleThinDelta } from './cbt/thin-delta/thin-delta-tracker.js';
import { DmEraTracker, cleanupStaleDmEra } from './cbt/dm-era/dm-era-tracker.js';
import type { AgentConfig } from './config.js';
import { NbdLocalMounter } from './mount/nbd-local-mounter.js';
import type { LocalMounter } from './mount/mount-port.js';
import { PgQuiescer } from './pg/pg-quiescer.js';
import type { AgentPorts, Dialer, QuiescerPort, TrackerPort } from './ports.js';
import { ReflinkSnapshotProvider } from './snapshot/reflink-snapshot-provider.js';
import { LvmSnapshotProvider } from './snapshot/lvm/lvm-snapshot-provider.js';
import { RetainingSnapshotProvider } from './snapshot/retaining-provider.js';
import type { SnapshotProvider } from './snapshot/snapshot-provider.js';
import { join } from 'node:path';

export interface ComposeContext {
  config: AgentConfig;
  log: Logger;
}

export interface AgentRegistry {
  providers: Record<string, (ctx: ComposeContext) => SnapshotProvider>;
  /** null: no tracker ("off"). */
  trackers: Record<string, ((ctx: ComposeContext) => TrackerPort) | null>;
  quiescers: Record<string, (ctx: ComposeContext) => QuiescerPort>;
  dial: Dialer;
}

export const registry: AgentRegistry = {
  providers: {
    reflink: ({ config, log }) => new ReflinkSnapshotProvider({ stateDir: config.stateDir, logger: log, volumes: config.volumes }),
    'lvm-classic': ({ config, log }) => new LvmSnapshotProvider({ mode: 'classic', agent: config.agent, stateDir: config.stateDir, logger: log }),
    'lvm-thin': ({ config, log }) => new LvmSnapshotProvider({ mode: 'thin', agent: config.agent, stateDir: config.stateDir, logger: log }),
  },
  trackers: {
    tracefs: ({ config, log }) => ({
      kind: 'tracefs',
      cleanupStale: async () => (await cleanupStaleInstances()).map((i) => `tracing instance ${i}`),
      create: () => new TracefsTracker({ log, bufferSizeKb: config.trackerBufferKb }),
    }),
    'thin-delta': ({ log }) => ({
      kind: 'thin-delta',
      cleanupStale: () => cleanupStaleThinDelta(),
      create: () => new ThinDeltaTracker({ log }),
    }),
    'dm-era': ({ log }) => ({
      kind: 'dm-era',
      cleanupStale: () => cleanupStaleDmEra(),
      create: () => new DmEraTracker({ log }),
    }),
    off: null,
  },
  quiescers: {
    postgres: ({ config, log }) => {
      const p = config.postgres;
      if (!p) throw new BlocksnapError('E_CONFIG', 'quiescer "postgres" needs the "postgres" section');
      const stateDir = join(config.stateDir, 'pg');
      return {
        factory: (log) => new PgQuiescer({
          connection: connectionOf(p), role: p.role, stateDir, pauseTimeoutMs: p.pauseTimeoutMs, watchdogSeconds: p.watchdogSeconds, logger: log,
        }),
        releaseStale: () => PgQuiescer.releaseStale({ stateDir, connection: connectionOf(p), logger: log }),
      };
    },
  },
  dial: (url, opts) => connectWs(url, opts),
};

/** `base` with `extra`'s entries added (tests register their fakes this way). */
export function extendRegistry(base: AgentRegistry, extra: Partial<AgentRegistry>): AgentRegistry {
  return {
    providers: { ...base.providers, ...extra.providers },
    trackers: { ...base.trackers, ...extra.trackers },
    quiescers: { ...base.quiescers, ...extra.quiescers },
    dial: extra.dial ?? base.dial,
  };
}

/** The names config.ts accepts for `provider`, `tracking` and `quiescer`. */
export interface RegistryNames {
  providers: string[];
  trackers: string[];
  quiescers: string[];
}

export function namesOf(r: AgentRegistry): RegistryNames {
  return { providers: Object.keys(r.providers), trackers: Object.keys(r.trackers), quiescers: Object.keys(r.quiescers) };
}

/** The quiescer the config names; by default PostgreSQL when a server is configured. */
export function quiescerName(config: AgentConfig): string | null {
  return config.quiescer ?? (config.postgres ? 'postgres' : null);
}

/**
 * The ports `config` names. `overrides` replace single ports (a test that
 * keeps a handle on its provider).
 */
export function agentPorts(config: AgentConfig, log: Logger, r: AgentRegistry = registry, overrides: Partial<AgentPorts> = {}): AgentPorts {
  const ctx = { config, log };
  const entry = <T>(map: Record<string, T>, key: string, name: string): T => {
    if (!(name in map)) throw new BlocksnapError('E_CONFIG', `${key}: no ${JSON.stringify(name)} here (known: ${Object.keys(map).join(', ')})`);
    return map[name]!;
  };
  let provider = overrides.provider;
  if (!provider) {
    provider = entry(r.providers, 'provider', config.provider)(ctx);
    if (config.retainSnapshotsDir) provider = new RetainingSnapshotProvider(provider, config.retainSnapshotsDir);
  }
  const tracker = overrides.tracker !== undefined ? overrides.tracker : entry(r.trackers, 'tracking', config.tracking)?.(ctx) ?? null;
  const q = quiescerName(config);
  const quiescer = overrides.quiescer !== undefined ? overrides.quiescer : q === null ? null : entry(r.quiescers, 'quiescer', q)(ctx);
  const mounter = overrides.mounter !== undefined ? overrides.mounter : composeMounter(config, log);
  return { provider, tracker, quiescer, dial: overrides.dial ?? r.dial, mounter };
}

/** An Agent composed from its config (the CLI's `run`, and test fixtures). */
export function composeAgent(
  config: AgentConfig, log: Logger, opts: { registry?: AgentRegistry; ports?: Partial<AgentPorts>; hooks?: AgentHooks } = {},
): Agent {
  return new Agent(config, agentPorts(config, log, opts.registry, opts.ports), log, opts.hooks);
}

/** `blocksnap-agent cleanup`: what every registered tracker kind releases of an earlier run. */
export async function staleOfEveryTracker(config: AgentConfig, log: Logger, r: AgentRegistry = registry): Promise<string[]> {
  const released: string[] = [];
  for (const make of Object.values(r.trackers)) if (make) released.push(...(await make({ config, log }).cleanupStale()));
  return released;
}

/**
 * The agent's LocalMounter (instant mount, issue 9): nbdfuse + loop here, the
 * kernel nbd-client where /dev/nbd0 exists (agent/mount/nbd-attacher.ts);
 * state files under STATE/mounts/. Call its cleanupOrphans() on every start.
 */
export function composeMounter(config: AgentConfig, log: Logger): LocalMounter {
  return new NbdLocalMounter({ stateDir: config.stateDir, log, ...(config.ca ? { ca: config.ca } : {}) });
}
