import { describe, expect, it } from 'vitest';
import { parseAgentConfig } from '../../agent/config.js';

/** `groups` in the agent configuration (DESIGN.md §4.4): what is accepted and what is refused, with why. */
const base = {
  appliance: 'ws://127.0.0.1:7700/v1/agent', agent: 'db1', token: 't', stateDir: '/var/lib/blocksnap',
  volumes: ['pgdata', 'pgwal', 'ts1'].map((name) => ({ name, device: `/dev/${name}`, mountpoint: `/srv/${name}` })),
};

describe('agent config: consistency groups', () => {
  it('accepts groups and defaults to none', () => {
    expect(parseAgentConfig(base).groups).toEqual([]);
    const c = parseAgentConfig({ ...base, groups: [{ name: 'pg', volumes: ['pgdata', 'pgwal'] }] });
    expect(c.groups).toEqual([{ name: 'pg', volumes: ['pgdata', 'pgwal'] }]);
  });

  it.each([
    [{ groups: [{ name: 'pg', volumes: ['pgdata', 'ghost'] }] }, /"ghost" is not a configured volume/],
    [{ groups: [{ name: 'a', volumes: ['pgdata'] }, { name: 'b', volumes: ['pgdata'] }] }, /in groups a and b/],
    [{ groups: [{ name: 'pgwal', volumes: ['pgdata'] }] }, /has the name of a volume/],
    [{ groups: [{ name: 'pg', volumes: [] }] }, /must list 1\.\.64 volumes/],
    [{ groups: [{ name: 'pg', volumes: ['pgdata'] }, { name: 'pg', volumes: ['pgwal'] }] }, /listed twice/],
    [{ groups: {} }, /"groups" must be an array/],
  ])('refuses %j', (patch, why) => {
    expect(() => parseAgentConfig({ ...base, ...patch })).toThrow(why);
  });
});
