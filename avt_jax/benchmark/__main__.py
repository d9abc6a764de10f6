"""`python -m avt_jax.benchmark`: see `avt_jax.benchmark`."""

from avt_jax.benchmark import cli

if __name__ == '__main__':
  cli.main()
