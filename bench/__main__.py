from bench.lag import main

main()
