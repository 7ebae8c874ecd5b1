import type { Agent } from '../../agent/agent.js';
import { createLogger } from '../../proto/shared/log.js';
import { startAppliance, type ApplianceHarness } from './appliance-harness.js';
import { PgCluster, type PgClusterOptions } from './pg-cluster.js';
import { spawnAgent, spawnAppliance, type ApplianceProcess, type Daemon } from './processes.js';
import { createVolumeLab, type VolumeLab, type VolumeLabOptions } from './volume-lab.js';
import { Disposables } from './disposables.js';
import { startPgAgent, startTestAgent, type PgAgentOptions, type TestAgent, type TestAgentOptions } from './pg-agent.js';

/**
 * The e2e set-up: volume labs (loop devices + filesystems), PostgreSQL
 * clusters, an appliance (in process or as a process) and agents (in
 * process or as processes). Each method creates one thing and registers
 * how to release it; `dispose()` releases them in reverse order.
 */
export class E2eFixture extends Disposables {
  /** A volume lab; destroyed (unmount, detach, remove) at dispose. */
  async lab(opts: VolumeLabOptions): Promise<VolumeLab> {
    const lab = await createVolumeLab(opts);
    return this.add(`volume lab ${opts.name ?? ''}`, lab, (l) => l.destroy());
  }

  /**
   * A PostgreSQL cluster, registered before initdb so a failed start is
   * released too; `init` runs initdb + start (default true).
   */
  async pg(opts: PgClusterOptions, init = true): Promise<PgCluster> {
    const pg = this.add(`PostgreSQL in ${opts.dataDir}`, new PgCluster(opts), (p) => p.destroy());
    if (init) {
      await pg.initdb();
      await pg.start();
    }
    return pg;
  }

  /** An in-process appliance with these agents registered; closed (and its temp data removed) at dispose. */
  async appliance(...args: Parameters<typeof startAppliance>): Promise<ApplianceHarness> {
    const appl = await startAppliance(...args);
    return this.add('appliance', appl, (a) => a.close());
  }

  /** `blocksnap-appliance serve` as a process (dist/); stopped at dispose. */
  async applianceProcess(...args: Parameters<typeof spawnAppliance>): Promise<ApplianceProcess> {
    const appl = await spawnAppliance(...args);
    return this.add(`appliance process ${appl.pid}`, appl, (a) => a.stop());
  }

  /** An in-process agent (reflink volumes); stopped at dispose. */
  async agent(opts: Omit<TestAgentOptions, 'log'> & { log?: TestAgentOptions['log'] }): Promise<TestAgent> {
    const t = await startTestAgent({ ...opts, log: opts.log ?? testLogger() });
    return this.add(`agent ${opts.name}`, t, (a) => a.agent.stop());
  }

  /** An in-process agent for one PostgreSQL volume; stopped at dispose. */
  async pgAgent(opts: Omit<PgAgentOptions, 'log'> & { log?: PgAgentOptions['log'] }): Promise<Agent> {
    const a = await startPgAgent({ ...opts, log: opts.log ?? testLogger() });
    return this.add(`agent ${opts.name}`, a, (x) => x.stop());
  }

  /** `blocksnap-agent run` as a process (dist/); stopped at dispose (stopping twice is harmless). */
  agentProcess(...args: Parameters<typeof spawnAgent>): Daemon {
    const d = spawnAgent(...args);
    return this.add(`agent process ${d.pid}`, d, (x) => x.stop());
  }
}

export function testLogger() {
  return createLogger('test-agent', process.env.BLOCKSNAP_LOG ?? 'warn');
}

export function e2eFixture(): E2eFixture {
  return new E2eFixture();
}
