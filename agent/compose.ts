/**
 * Where the agent's ports get their implementations (DESIGN.md §7): the CLI
 * composes here, test fixtures too. Adding a snapshot provider, a tracker or
 * a quiescer is one new folder and one line in a map below; the config keys
 * `provider`, `tracking` and `quiescer` name an entry (config.ts checks the
 * names against the registry it is given).
 *
 * Start-up cost: this module imports no implementation. Each entry imports
 * its implementation with `import()` when it is composed, so config.ts (which
 * needs only the names) and the commands that only read the config (`status`,
 * `volumes`, `audit`, `restore`, `mount`) do not load LVM, dm-era, thin-delta,
 * pg, execa or ws (test/agent/compose-lazy.test.ts pins it).
 */
import type { Logger } from 'pino';
import { join } from 'node:path';
import { BlocksnapError } from '../proto/errors.js';
import type { Agent, AgentHooks } from './agent.js';
import type { AgentConfig } from './config.js';
import type { LocalMounter } from './mount/mount-port.js';
import type { AgentPorts, Dialer, QuiescerPort, TrackerPort } from './ports.js';
import type { SnapshotProvider } from './snapshot/snapshot-provider.js';

export interface ComposeContext {
  config: AgentConfig;
  log: Logger;
}

type Factory<T> = (ctx: ComposeContext) => T | Promise<T>;

export interface AgentRegistry {
  providers: Record<string, Factory<SnapshotProvider>>;
  /** null: no tracker ("off"). */
  trackers: Record<string, Factory<TrackerPort> | null>;
  quiescers: Record<string, Factory<QuiescerPort>>;
  dial: Dialer;
}

export const registry: AgentRegistry = {
  providers: {
    reflink: async ({ config, log }) => new (await import('./snapshot/reflink-snapshot-provider.js')).ReflinkSnapshotProvider({ stateDir: config.stateDir, logger: log, volumes: config.volumes }),
    'lvm-classic': async ({ config, log }) => new (await import('./snapshot/lvm/lvm-snapshot-provider.js')).LvmSnapshotProvider({ mode: 'classic', agent: config.agent, stateDir: config.stateDir, logger: log }),
    'lvm-thin': async ({ config, log }) => new (await import('./snapshot/lvm/lvm-snapshot-provider.js')).LvmSnapshotProvider({ mode: 'thin', agent: config.agent, stateDir: config.stateDir, logger: log }),
  },
  trackers: {
    tracefs: async ({ config, log }) => {
      const [{ cleanupStaleInstances }, { TracefsTracker }] = await Promise.all([import('./cbt/tracefs/tracefs-instance.js'), import('./cbt/tracefs/tracefs-tracker.js')]);
      return {
        kind: 'tracefs',
        cleanupStale: async () => (await cleanupStaleInstances()).map((i) => `tracing instance ${i}`),
        create: () => new TracefsTracker({ log, bufferSizeKb: config.trackerBufferKb }),
      };
    },
    'thin-delta': async ({ log }) => {
      const { ThinDeltaTracker, cleanupStaleThinDelta } = await import('./cbt/thin-delta/thin-delta-tracker.js');
      return { kind: 'thin-delta', cleanupStale: () => cleanupStaleThinDelta(), create: () => new ThinDeltaTracker({ log }) };
    },
    'dm-era': async ({ log }) => {
      const { DmEraTracker, cleanupStaleDmEra } = await import('./cbt/dm-era/dm-era-tracker.js');
      return { kind: 'dm-era', cleanupStale: () => cleanupStaleDmEra(), create: () => new DmEraTracker({ log }) };
    },
    off: null,
  },
  quiescers: {
    postgres: async ({ config, log }) => {
      const p = config.postgres;
      if (!p) throw new BlocksnapError('E_CONFIG', 'quiescer "postgres" needs the "postgres" section');
      const [{ PgQuiescer }, { connectionOf }] = await Promise.all([import('./pg/pg-quiescer.js'), import('./capture.js')]);
      const stateDir = join(config.stateDir, 'pg');
      return {
        factory: (log) => new PgQuiescer({
          connection: connectionOf(p), role: p.role, stateDir, pauseTimeoutMs: p.pauseTimeoutMs, watchdogSeconds: p.watchdogSeconds, logger: log,
        }),
        releaseStale: () => PgQuiescer.releaseStale({ stateDir, connection: connectionOf(p), logger: log }),
      };
    },
  },
  dial: async (url, opts) => (await import('../proto/ws-transport.js')).connectWs(url, opts),
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
export async function agentPorts(config: AgentConfig, log: Logger, r: AgentRegistry = registry, overrides: Partial<AgentPorts> = {}): Promise<AgentPorts> {
  const ctx = { config, log };
  const entry = <T>(map: Record<string, T>, key: string, name: string): T => {
    if (!(name in map)) throw new BlocksnapError('E_CONFIG', `${key}: no ${JSON.stringify(name)} here (known: ${Object.keys(map).join(', ')})`);
    return map[name]!;
  };
  let provider = overrides.provider;
  if (!provider) {
    provider = await entry(r.providers, 'provider', config.provider)(ctx);
    if (config.retainSnapshotsDir) provider = new (await import('./snapshot/retaining-provider.js')).RetainingSnapshotProvider(provider, config.retainSnapshotsDir);
  }
  const makeTracker = overrides.tracker !== undefined ? null : entry(r.trackers, 'tracking', config.tracking);
  const tracker = overrides.tracker !== undefined ? overrides.tracker : makeTracker ? await makeTracker(ctx) : null;
  const q = quiescerName(config);
  const quiescer = overrides.quiescer !== undefined ? overrides.quiescer : q === null ? null : await entry(r.quiescers, 'quiescer', q)(ctx);
  const mounter = overrides.mounter !== undefined ? overrides.mounter : await composeMounter(config, log);
  return { provider, tracker, quiescer, dial: overrides.dial ?? r.dial, mounter };
}

/** An Agent composed from its config (the CLI's `run`, and test fixtures). */
export async function composeAgent(
  config: AgentConfig, log: Logger, opts: { registry?: AgentRegistry; ports?: Partial<AgentPorts>; hooks?: AgentHooks } = {},
): Promise<Agent> {
  const [ports, { Agent }] = await Promise.all([agentPorts(config, log, opts.registry, opts.ports), import('./agent.js')]);
  return new Agent(config, ports, log, opts.hooks);
}

/** `blocksnap-agent cleanup`: what every registered tracker kind releases of an earlier run. */
export async function staleOfEveryTracker(config: AgentConfig, log: Logger, r: AgentRegistry = registry): Promise<string[]> {
  const released: string[] = [];
  for (const make of Object.values(r.trackers)) if (make) released.push(...(await (await make({ config, log })).cleanupStale()));
  return released;
}

/**
 * The agent's LocalMounter (instant mount, issue 9): nbdfuse + loop here, the
 * kernel nbd-client where /dev/nbd0 exists (agent/mount/nbd-attacher.ts);
 * state files under STATE/mounts/. Call its cleanupOrphans() on every start.
 */
export async function composeMounter(config: AgentConfig, log: Logger): Promise<LocalMounter> {
  const { NbdLocalMounter } = await import('./mount/nbd-local-mounter.js');
  return new NbdLocalMounter({ stateDir: config.stateDir, log, ...(config.ca ? { ca: config.ca } : {}) });
}
