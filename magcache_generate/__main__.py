from magcache_generate.cli import main

main()
