/**
 * `blocksnap-agent mount IMAGE`, `unmount MOUNT` and `mounts` (DESIGN.md
 * §4.5, §9): added to the CLI's program by agent/cli.ts; each asks the
 * running agent over its control socket (agent/mount-control.ts).
 */
import type { Command } from 'commander';
import { intOption } from '../proto/shared/cli-exit.js';
import type { AgentConfig } from './config.js';
import { callAgent } from './control-server.js';
import type { LocalMount } from './mount/mount-port.js';

export interface MountCliDeps {
  run: <A extends unknown[]>(fn: (...a: A) => Promise<number> | number) => (...a: A) => Promise<void>;
  configOf: (cmd: Command) => Promise<AgentConfig>;
  json: (cmd: Command) => boolean;
}

const print = (json: boolean, human: string, value: unknown) => process.stdout.write((json ? JSON.stringify(value, null, 2) : human) + '\n');

export function addMountCommands(p: Command, d: MountCliDeps): void {
  p.command('mount <image>')
    .description('mount an image (or image set) of the appliance here: attached over NBD, filesystems mounted, data directory prepared, ' +
      'PostgreSQL started; prints the connection string and the time from the command to the first answered query. Writes go to the ' +
      'appliance\'s copy-on-write overlay, never into the image')
    .option('--port <port>', 'PostgreSQL port of the copy (default: a free port), so it can run beside the source', intOption(1, 65535))
    .option('--target <dir>', 'directory to mount under (default: /run/blocksnap-mounts/MOUNT)')
    .option('--as-standby', 'start the copy as a standby')
    .option('--ttl <seconds>', 'the appliance ends the mount after this long (default: never)', intOption(1))
    .option('--json', 'machine-readable output')
    .action(d.run(async (image: string, o: { port?: number; target?: string; asStandby?: boolean; ttl?: number }, cmd: Command) => {
      const config = await d.configOf(cmd);
      const started = performance.now();
      const m = await callAgent<LocalMount>(config.stateDir, 'POST', '/v1/mount', {
        imageId: image, pgPort: o.port, target: o.target, asStandby: !!o.asStandby, ttlSeconds: o.ttl,
      });
      // The time the user waited: from this command to the copy's first answer.
      const seconds = (performance.now() - started) / 1000;
      const r = { ...m, secondsFromCommand: seconds };
      print(d.json(cmd), `mounted ${image} as ${m.mountId} at ${m.target}\n${m.connection}\nfirst query after ${seconds.toFixed(2)} s`, r);
      return 0;
    }));
  p.command('unmount <mount>')
    .description('stop the copy\'s PostgreSQL, unmount, detach, and end the mount on the appliance (its overlay is deleted)')
    .option('--json', 'machine-readable output')
    .action(d.run(async (mountId: string, _o: unknown, cmd: Command) => {
      const config = await d.configOf(cmd);
      const r = await callAgent<{ ok: boolean; mountId: string }>(config.stateDir, 'POST', '/v1/unmount', { mountId });
      print(d.json(cmd), `unmounted ${mountId}`, r);
      return 0;
    }));
  p.command('mounts')
    .description('images mounted on this host by the running agent')
    .option('--json', 'machine-readable output')
    .action(d.run(async (_o: unknown, cmd: Command) => {
      const config = await d.configOf(cmd);
      const rows = await callAgent<LocalMount[]>(config.stateDir, 'GET', '/v1/mounts');
      print(d.json(cmd), rows.map((m) => [m.mountId, m.imageId, m.target, m.connection].join('\t')).join('\n') || '(no mounts)', rows);
      return 0;
    }));
}
