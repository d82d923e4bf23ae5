fw samp add -a d -l r -t 3600 -n samgate -c samgate:0123456789abcdef0123456789abcdef -o samgate ip -s 192.0.2.1 -C; echo "samgate-rule 0 $?"
fw samp get -k comment -t in -v samgate:0123456789abcdef0123456789abcdef; echo "samgate-rule 1 $?"
fw samp batch <<EOT
add -a d -t 60 ip -s 192.0.2.3
del <5ac3965f,00000000,3403a8c0,00003312>
EOT
fw samp add -t 2 quota flush true >/dev/null
