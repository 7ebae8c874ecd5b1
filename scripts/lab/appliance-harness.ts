import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { createLogger } from '../../proto/shared/log.js';
import { Appliance, type ApplianceOptions } from '../../appliance/server/appliance.js';
import { applianceBackends } from '../../appliance/compose.js';

/** An in-process appliance on 127.0.0.1:<free port> in a temp data dir, with agents registered. */
export interface ApplianceHarness {
  app: Appliance;
  dataDir: string;
  url: string;
  tokens: Record<string, string>;
  close(opts?: { keepData?: boolean }): Promise<void>;
}

export async function startAppliance(
  agents: string[] = ['db1'],
  opts: Partial<ApplianceOptions> & { dataDir?: string } = {},
): Promise<ApplianceHarness> {
  const dataDir = opts.dataDir ?? (await mkdtemp(join(tmpdir(), 'bsn-appliance-')));
  const app = await Appliance.open({
    logger: createLogger('test-appliance', process.env.BLOCKSNAP_LOG ?? 'warn'),
    // Tests refused on purpose many times from 127.0.0.1 must not lock out the next test's login (auth-guard.ts).
    authGuard: { failBurst: 10_000 },
    backends: applianceBackends(), // a test may pass its own (opts.backends)
    ...opts, dataDir,
  });
  const tokens: Record<string, string> = {};
  for (const a of agents) tokens[a] = app.catalog.agent(a) ? app.catalog.rotateToken(a) : app.catalog.addAgent(a);
  const { url } = await app.listen('127.0.0.1', 0);
  let closed = false;
  return {
    app, dataDir, url, tokens,
    async close({ keepData = false } = {}) {
      if (!closed) await app.close();
      closed = true;
      if (!keepData && !opts.dataDir) await rm(dataDir, { recursive: true, force: true });
    },
  };
}
