import { describe, expect, it } from 'vitest';
import { Disposables } from './disposables.js';

describe('Disposables (the e2e fixture release order)', () => {
  it('releases in reverse order of registration', async () => {
    const d = new Disposables();
    const order: string[] = [];
    d.add('lab', 'L', (v) => order.push(v));
    d.defer('appliance', () => order.push('A'));
    d.add('agent', 'G', async (v) => { order.push(v); });
    await d.dispose();
    expect(order).toEqual(['G', 'A', 'L']);
  });

  it('runs every release when some throw, then throws them all', async () => {
    const d = new Disposables();
    const order: string[] = [];
    d.defer('lab', () => order.push('lab'));
    d.defer('appliance', () => { throw new Error('close failed'); });
    d.defer('pg', async () => { order.push('pg'); });
    d.defer('agent', async () => { throw new Error('stop failed'); });
    const err = await d.dispose().then(() => undefined, (e: unknown) => e);
    expect(order).toEqual(['pg', 'lab']);
    expect(err).toBeInstanceOf(AggregateError);
    expect((err as AggregateError).errors.map((e: Error) => e.message)).toEqual([
      'releasing agent failed: stop failed', 'releasing appliance failed: close failed',
    ]);
  });

  it('one failure is thrown as itself, and a second dispose has nothing left', async () => {
    const d = new Disposables();
    let n = 0;
    d.defer('x', () => { n++; throw new Error('boom'); });
    await expect(d.dispose()).rejects.toThrow('releasing x failed: boom');
    await d.dispose();
    expect(n).toBe(1);
  });

  it('a set-up step that throws leaves what came before it registered', async () => {
    const d = new Disposables();
    const released: string[] = [];
    const setUp = async () => {
      d.add('lab', 'lab', (v) => released.push(v));
      d.add('appliance', 'appliance', (v) => released.push(v));
      throw new Error('agent did not connect');
    };
    await expect(setUp()).rejects.toThrow('agent did not connect');
    await d.dispose();
    expect(released).toEqual(['appliance', 'lab']);
  });
});
